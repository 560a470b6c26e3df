# mle task shim: run one task's command, then record how it ended.
#
# Usage: sh shim.sh STATUS_FILE COMMAND [ARG...]
# The agent starts this as a session leader with stdout and stderr already redirected to files in
# the task's directory, so the task outlives an agent crash; the status file tells a restarted agent
# how it ended. A bare name such as `cd` or `echo` runs through `exec` in a subshell so that it is
# looked up on PATH like any program, never taken as a shell builtin; a name with a slash (every
# shell step runs `/bin/sh -c ...`) is never a builtin, so it runs as a plain command, which the
# shell starts without copying itself first (0.2 ms less per task). A status above 128 means the
# command was killed by signal (status - 128). If this shim itself is killed, nothing is written.
#
# The status is one write of a few bytes, with no tmp file and `mv` (an extra process per task, a
# fifth of the dispatch cost): the agent reads it only once this shim is gone, when the file can
# only be absent, empty (killed mid-write: no status) or complete, so a rename would add nothing.
status=$1
shift
case $1 in
*/*) "$@" ;;
*) (exec "$@") ;;
esac
code=$?
echo "$code" >"$status"
exit "$code"
