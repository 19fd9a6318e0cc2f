#!/usr/bin/env bash
# Print the cached kernel tree the module builds against.
. "$(dirname "$0")/lib.sh"
dmq_kdir
