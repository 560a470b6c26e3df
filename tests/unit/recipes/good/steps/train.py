"""A stand-in step shipped by pipeline.yaml."""

print("train")
