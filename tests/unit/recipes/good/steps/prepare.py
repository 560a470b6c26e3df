import sys
print("prepare", sys.argv)
