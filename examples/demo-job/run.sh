#!/bin/sh
# The README's demo job: runs on a node of the cluster, in an unpacked copy of this directory.
echo "hello from job $RAYCTL_JOB_ID"
echo "cluster heads: $RAYCTL_ADDRESS"
echo "working dir: $(pwd)"
echo "files shipped with the job: $(ls | tr '\n' ' ')"
