"""Turn the JSON of ``cpconv bench --json FILE`` into the markdown tables of BENCHMARKS.md.

Usage: ``python benchmarks/fused_report.py FILE.json``
"""
import json, sys, math
d = json.load(open(sys.argv[1]))
def g(v): return math.exp(sum(map(math.log, v))/len(v))
for T in sorted({r["threads"] for r in d["layers"]}):
    rows = [r for r in d["layers"] if r["threads"] == T]
    ceil = d["ceiling_gflops"][str(T)]
    src = d.get("ceiling_sources", {}).get(str(T))
    how = (f": the faster of torch.mm {src['torch_mm']:.1f} and numpy matmul "
           + (f"{src['numpy_matmul']:.1f}" if src["numpy_matmul"] else "(unavailable)")) if src else ""
    print(f"\n**{T} thread(s)** — ceiling (2048² sgemm) {ceil:.1f} GFLOP/s{how}\n")
    print("| layer | R | dense | dense CL | torch 4-stage | torch 4-stage CL | ORT 4-stage | fused | fused GFLOP/s | ORT GFLOP/s | fused / ORT | fused / best torch | fused / ceiling | kernel-only / ceiling | stage 1 / 2+3 / 4 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["seconds"]; gf = r["gflops"]
        bt = min(s["torch4"], s["torch4_cl"])
        print(f"| {r['layer']} | {r['rank']} | {s['dense']*1e3:.2f} | {s['dense_cl']*1e3:.2f} | {s['torch4']*1e3:.3f} | {s['torch4_cl']*1e3:.3f} | {s['ort4']*1e3:.3f} | {s['fused']*1e3:.3f} | {gf['fused']:.1f} | {gf['ort4']:.1f} | {s['ort4']/s['fused']:.2f} | {bt/s['fused']:.2f} | {gf['fused']/ceil:.2f} | {r['fused_kernel_cpu_gflops']/ceil:.2f} | " + " / ".join(f"{100*x:.0f}%" for x in r["fused_stage_share"]) + " |")
    print(f"\nGeomeans ({len(rows)} layer x rank): fused / ORT **{g([r['seconds']['ort4']/r['seconds']['fused'] for r in rows]):.2f}x**, "
          f"fused / faster PyTorch 4-stage **{g([min(r['seconds']['torch4'],r['seconds']['torch4_cl'])/r['seconds']['fused'] for r in rows]):.2f}x**, "
          f"fused / ceiling **{g([r['gflops']['fused']/ceil for r in rows]):.2f}**, kernel alone (CPU-time counters) / ceiling **{g([r['fused_kernel_cpu_gflops']/ceil for r in rows]):.2f}**, "
          f"fused / dense (faster layout) {g([min(r['seconds']['dense'],r['seconds']['dense_cl'])/r['seconds']['fused'] for r in rows]):.2f}x, ORT / ceiling {g([r['gflops']['ort4']/ceil for r in rows]):.2f}.")
for m in d.get("models", []):
    print(f"\nAlexNet 224x224, {m['threads']} thread(s), ranks {m['ranks']}: " + ", ".join(f"{k} {v*1e3:.1f} ms" for k,v in m["seconds"].items()))
