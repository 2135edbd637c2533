#!/bin/sh
# Interleaved: P = pre-hardening b930557 (/tmp/streamhub-pre), B = branch perf (/tmp/streamhub-new).
cd /tmp/ab
unset RUST_BACKTRACE
N=${N:-3}
for i in $(seq 1 $N); do
  for v in pre new; do
    bin=/tmp/streamhub-$v
    echo "$(date -u +%T) fanout $v $i (load $(cut -d' ' -f1 /proc/loadavg))"
    $bin bench fanout --targets streamhub --no-nats --repetitions 1 --subscribers 1000,10000,100000 --rounds 5 --saturation 5 --out pfan-$v-$i.json > pfan-$v-$i.log 2>&1
  done
done
for i in 4 5; do
  for v in base new; do
    bin=/tmp/streamhub-$v
    echo "$(date -u +%T) chat $v $i (load $(cut -d' ' -f1 /proc/loadavg))"
    $bin bench chat --targets streamhub --repetitions 1 --out chat-$v-$i.json > chat-$v-$i.log 2>&1
  done
done
echo "$(date -u +%T) done"
