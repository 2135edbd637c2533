import json, glob, statistics as st, sys, os
os.chdir('/tmp/ab')
def load(pat):
    out=[]
    for f in sorted(glob.glob(pat)):
        try: out.append(json.load(open(f)))
        except Exception as e: print('bad',f,e)
    return out
def fan(d):
    r={}
    for row in d['rows']:
        m=row.get('median') or {}
        r[int(row['config']['subscribers'])]=m
    return r
def med(xs): return st.median(xs) if xs else float('nan')
def fan_table(a,b,la,lb):
    A=[fan(d) for d in load(a)]; B=[fan(d) for d in load(b)]
    print(f'fanout {la} n={len(A)} vs {lb} n={len(B)}')
    for n in (1000,10000,100000):
        for key in ('deliveries_per_s','cpu_ns_per_delivery','reach_p99_us','mem_per_sub_bytes','server_cpu_pct','load_cpu_pct'):
            xa=[x[n][key] for x in A if n in x and key in x[n]]; xb=[x[n][key] for x in B if n in x and key in x[n]]
            if not xa or not xb: continue
            print(f'  {n:>6} {key:22} {la}: {med(xa):12.1f} {[round(v) for v in xa]}  {lb}: {med(xb):12.1f} {[round(v) for v in xb]}  ratio {med(xb)/med(xa):.3f}')
def chat(d):
    r={}
    for row in d['rows']:
        rate=row['config']['rate']; m=row.get('median')
        if m: r[rate]=m
    return r
def chat_table():
    A=[chat(d) for d in load('chat-base-*.json')]; B=[chat(d) for d in load('chat-new-*.json')]
    print(f'chat base n={len(A)} new n={len(B)}')
    for key in ('best_deliveries_per_s_p99_under_50ms','knee_rate_msgs_per_s'):
        xa=[x['summary'].get(key) for x in A if 'summary' in x]; xb=[x['summary'].get(key) for x in B if 'summary' in x]
        print(f'  summary {key}: base {xa} new {xb}')
    for rate in ('100','200','400','800','1600'):
        def f(x):
            m=x.get(rate)
            if not m or not m.get('deliveries_per_s'): return None
            return m['server_cpu_pct']/100*1e9/m['deliveries_per_s']
        xa=[f(x) for x in A if f(x)]; xb=[f(x) for x in B if f(x)]
        pa=[x[rate]['latency_p99_us']/1000 for x in A if rate in x]; pb=[x[rate]['latency_p99_us']/1000 for x in B if rate in x]
        p5a=[x[rate]['latency_p50_us']/1000 for x in A if rate in x]; p5b=[x[rate]['latency_p50_us']/1000 for x in B if rate in x]
        da=[x[rate]['deliveries_per_s'] for x in A if rate in x]; db=[x[rate]['deliveries_per_s'] for x in B if rate in x]
        if xa and xb:
            print(f'  rate {rate:>5}: cpu ns/delivery base {med(xa):7.0f} {[round(v) for v in xa]} new {med(xb):7.0f} {[round(v) for v in xb]} ratio {med(xb)/med(xa):.3f}; deliv/s base {med(da):.0f} new {med(db):.0f}; p50 ms base {med(p5a):.1f} new {med(p5b):.1f}; p99 ms base {med(pa):.1f} {[round(v) for v in pa]} new {med(pb):.1f} {[round(v) for v in pb]}')
fan_table('fanout-base-*.json','fanout-new-*.json','base','new')
chat_table()
fan_table('count-on-*.json','count-off-*.json','count-on','count-off')
