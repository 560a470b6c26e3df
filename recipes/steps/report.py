"""Join the count and the shouted words into a report."""

import os
import sys

count_file, loud_file, report_file = sys.argv[1:4]
title = os.environ.get("REPORT_TITLE", "report")
with open(count_file) as f:
    count = f.read().strip()
with open(loud_file) as f:
    words = f.read().split()
with open(report_file, "w") as f:
    f.write(f"{title}\nrun {os.environ['MLE_RUN_ID']}: {count} words: {' '.join(words)}\n")
print(f"{title}: {count} words")
