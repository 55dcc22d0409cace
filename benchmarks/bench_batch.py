"""`slmops batch` and adapters, side by side in one run:

- the wall time of one manifest (the embedded SmolLM2 at fp32 and int8, and a LoRA fine-tune of it at int8; every
  job converted, validated against its source) on the local pool (2 jobs at once) and on a 2-node Ray cluster made
  on this machine (ray.cluster_utils: two raylets, one CPU each), each from an empty cache;
- serving a fine-tune as an adapter of a shared base against serving it merged: decode tok/s after prompts of 16,
  128 and 512 tokens, the same RTN int4 weights, ORT GenAI.

    python benchmarks/bench_batch.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_hf_int4 import SWEEP, decode_sweep  # noqa: E402

SLMOPS = [sys.executable, "-c", "from slmops.cli import main; main()"]
FAST = """
[defaults]
bench = { runs = 1, warmup = 0, max_new_tokens = 8, lengths = [16] }
validate = { soak_requests = 4, max_kld = 1.0, min_top1 = 0.0 }
"""


def make_lora(checkpoint: Path, out: Path) -> Path:
    """A seeded LoRA on SmolLM2's attention and MLP (what a fine-tune leaves), written once."""
    if (out / "adapter_config.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(checkpoint),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    model.save_pretrained(out)
    return out


def timed_batch(manifest: Path, home: Path, *args: str) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    done = subprocess.run(
        [*SLMOPS, "-q", "batch", str(manifest), "--json", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "SLMOPS_HOME": str(home)},
    )
    wall = time.perf_counter() - start
    try:
        return wall, json.loads(done.stdout)["jobs"]
    except (ValueError, KeyError):
        raise SystemExit(f"slmops batch {' '.join(args)} failed: {done.stderr[-1500:]}") from None


def main() -> None:
    from slmops.build import convert, sources
    from slmops.config import home

    checkpoint = sources.resolve("default").checkpoint
    lora = make_lora(checkpoint, home() / "bench" / "smollm2-lora-0")
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    manifest = work / "jobs.toml"
    manifest.write_text(
        FAST
        + '[[models]]\nsource = "default"\nname = "smol"\nprecisions = ["fp32", "int8"]\n'
        + f'[[models]]\nsource = "default"\nname = "tuned"\nprecisions = ["int8"]\nadapters = {{ lora = "{lora}" }}\n'
    )
    print("local pool, 2 jobs at once, from an empty cache ...", flush=True)
    local_s, local = timed_batch(manifest, work / "home-local", "--jobs", "2")
    print(f"  {local_s:.0f} s", flush=True)

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        print(f"Ray, 2 nodes of 1 CPU at {cluster.address}, from an empty cache ...", flush=True)
        ray_s, on_ray = timed_batch(manifest, work / "home-ray", "--executor", "ray", "--ray-address", cluster.address)
        print(f"  {ray_s:.0f} s", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()

    print(f"\n{'job':<22} {'local':>8} {'ray':>8} {'MB':>6} {'mean KLD':>9}")
    ray_rows = {(r["name"], r["adapter"], r["precision"]): r for r in on_ray}
    for r in local:
        other = ray_rows.get((r["name"], r["adapter"], r["precision"]), {})
        name = "-".join(x for x in (r["name"], r["adapter"], r["precision"]) if x)
        kld = f"{r['mean_kld']:>9.4f}" if r.get("mean_kld") is not None else f"{'-':>9}"
        print(f"{name:<22} {r['status']:>8} {other.get('status', '-'):>8} {r.get('size_mb') or 0:>6.0f} {kld}")
    for r in [*local, *on_ray]:
        if r["status"] == "failed":
            print(f"  failed: {'-'.join(x for x in (r['name'], r['adapter'], r['precision']) if x)}: {r.get('why')}")
    print(f"wall time: local pool {local_s:.0f} s, 2-node Ray {ray_s:.0f} s (ray / local {ray_s / local_s:.2f})")

    print("\nserving a fine-tune: an adapter of a shared base against the merged model (RTN int4) ...", flush=True)
    options = {"precision": "int4", "algorithm": "rtn"}
    base = convert.convert(None, {**options, "adapter": lora, "adapter_mode": "adapter"}).path
    merged = convert.convert(None, {**options, "adapter": lora, "adapter_mode": "merge"}).path
    from slmops.measure import quality
    from slmops.run.runtime import Session

    tokens = Session(merged).encode(" ".join(r["text"] for r in quality.load_set(shipped=True)))[: max(SWEEP)]
    speeds = decode_sweep({"adapter": base, "merged": merged}, tokens)  # in turn: the machine's drift weighs alike
    with_adapter, plain = speeds["adapter"], speeds["merged"]
    print(f"{'decode tok/s after':<34} " + " ".join(f"{n:>7}" for n in SWEEP))
    print(f"{'base + adapter (switched per request)':<34} " + " ".join(f"{with_adapter[n]:>7.1f}" for n in SWEEP))
    print(f"{'merged':<34} " + " ".join(f"{plain[n]:>7.1f}" for n in SWEEP))
    print(f"{'adapter / merged':<34} " + " ".join(f"{with_adapter[n] / plain[n]:>7.2f}" for n in SWEEP))


if __name__ == "__main__":
    main()
