"""The bottom layer every package may import: errors, the Sample record, units and JSON output."""
