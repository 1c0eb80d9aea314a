"""One cold start, in a fresh process: `python -m bench.measure.coldstart_child SETTINGS_JSON`.

Prints one JSON line: wall-clock times (time.time()) of process start (the first statement
here), imports done, weights loaded (as the configuration's transforms ask) and first token
(the transforms applied, one image request served), and this process's page faults, block
reads and peak RSS. The parent subtracts the moment it spawned this process.
"""

import time

STARTED = time.time()

import json  # noqa: E402 (the clock above must be read before anything is imported)
import resource  # noqa: E402
import sys  # noqa: E402


def main(argv: list[str]) -> int:
    settings = json.loads(argv[1])
    import torch

    from bench.configuration import TransformSpec
    from models.checkpoint import load_model_dir
    from models.dataset import make_examples
    from models.generation import generate
    from optimizations.registry import apply_transforms, get_transform

    imported = time.time()
    torch.set_num_threads(settings["threads"])
    specs = [TransformSpec(t["name"], t["params"]) for t in settings["transforms"]]
    options: dict = {}
    for spec in specs:
        options.update(get_transform(spec.name, spec.params).load_options)
    bundle = load_model_dir(
        settings["directory"], dtype=getattr(torch, settings["dtype"]), **options
    )
    loaded = time.time()
    bundle = apply_transforms(bundle, specs, copy=False)
    (example,) = make_examples(0, "test", 1, 1.0)  # an image request: every module runs
    generate(bundle, bundle.prompts.encode(example), 1)
    first_token = time.time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "started": STARTED,
                "imported": imported,
                "loaded": loaded,
                "first_token": first_token,
                "major_faults": usage.ru_majflt,
                "minor_faults": usage.ru_minflt,
                "block_reads": usage.ru_inblock,
                "peak_rss_kib": usage.ru_maxrss,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
