"""A file that outputs-shipped-file.yaml ships and then tries to overwrite."""

print("prep")
