#!/bin/sh
# Interleaved A/B: A = main 6464ede (/tmp/streamhub-base), B = branch perf (/tmp/streamhub-new).
cd /tmp/ab
unset RUST_BACKTRACE
A=/tmp/streamhub-base; B=/tmp/streamhub-new
N=${N:-3}
for i in $(seq 1 $N); do
  for v in base new; do
    bin=$A; [ $v = new ] && bin=$B
    echo "$(date -u +%T) fanout $v $i (load $(cut -d' ' -f1 /proc/loadavg))"
    $bin bench fanout --targets streamhub --no-nats --repetitions 1 --subscribers 1000,10000,100000 --rounds 5 --saturation 5 --out fanout-$v-$i.json > fanout-$v-$i.log 2>&1
  done
done
for i in $(seq 1 $N); do
  for v in base new; do
    bin=$A; [ $v = new ] && bin=$B
    echo "$(date -u +%T) chat $v $i (load $(cut -d' ' -f1 /proc/loadavg))"
    $bin bench chat --targets streamhub --repetitions 1 --out chat-$v-$i.json > chat-$v-$i.log 2>&1
  done
done
for i in $(seq 1 $N); do
  for v in on off; do
    echo "$(date -u +%T) counters $v $i (load $(cut -d' ' -f1 /proc/loadavg))"
    c=true; [ $v = off ] && c=false
    $B bench fanout --targets streamhub --no-nats --repetitions 1 --subscribers 1000,10000,100000 --rounds 5 --saturation 5 --server-set http.count=$c --out count-$v-$i.json > count-$v-$i.log 2>&1
  done
done
echo "$(date -u +%T) done"
