"""Write a greeting, repeated, one word per line."""

import argparse

parser = argparse.ArgumentParser()
parser.add_argument("--greeting", required=True)
parser.add_argument("--repeat", type=int, required=True)
parser.add_argument("--out", required=True)
args = parser.parse_args()

with open(args.out, "w") as f:
    for i in range(args.repeat):
        f.write(f"{args.greeting}-{i + 1}\n")
print(f"wrote {args.repeat} words to {args.out}")
