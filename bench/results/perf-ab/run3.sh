#!/bin/sh
# Three-way interleave: pre-hardening b930557, main 6464ede, branch perf.
cd /tmp/ab
unset RUST_BACKTRACE
for i in 1 2; do
  for v in pre base new; do
    echo "$(date -u +%T) fanout $v $i (load $(cut -d' ' -f1 /proc/loadavg))"
    /tmp/streamhub-$v bench fanout --targets streamhub --no-nats --repetitions 1 --subscribers 1000,10000,100000 --rounds 5 --saturation 5 --out tri-$v-$i.json > tri-$v-$i.log 2>&1
  done
done
echo "$(date -u +%T) done"
