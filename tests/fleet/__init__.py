"""Fleet tests: several hosts in network namespaces on one bridge, a real agent on each."""
