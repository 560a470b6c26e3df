"""Upper-case a file."""

import sys

source, target = sys.argv[1], sys.argv[2]
with open(source) as f, open(target, "w") as out:
    out.write(f.read().upper())
print(f"shouted {source} into {target}")
