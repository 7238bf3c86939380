"""The markdown report of one run's results (the dict that is also written as JSON)."""

from __future__ import annotations

from .common import CONTENDERS, RATIOS


def format_report(result: dict) -> str:
    s = result["settings"]
    models = result["results"]
    lines = [f"## One training epoch, {s['data']} ({s['n_train']} images, batch {s['batch_size']}, "
             f"{s['steps_per_epoch']} steps), device {s['device']}, median of {s['repeats']} "
             f"rounds after 1 warm-up", "", _machine_line(result), ""]
    for label, m in models.items():
        floor = m["contenders"].get("floor", {}).get("median")
        lines += [f"### {label}", "",
                  "| contender | median s/epoch | min s | µs/step | × GEMM floor | train acc |",
                  "|---|---:|---:|---:|---:|---:|"]
        for entry in m["contenders"].values():
            med = entry.get("median")
            if med is None:
                lines.append(f"| {entry['name']} | {entry['status']} | | | | |")
                continue
            acc = entry.get("train_accuracy")
            cells = [entry["name"], f"{med:.3f}", f"{entry['min']:.3f}",
                     f"{med / m['steps_per_epoch'] * 1e6:.0f}",
                     f"{med / floor:.2f}" if floor else "–",
                     "–" if acc is None else f"{acc:.2%}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    ratios = [(f"{CONTENDERS[a]} / {CONTENDERS[b]}", [models[label]["ratios"].get(key)
                                                        for label in models])
              for key, a, b in RATIOS]
    lines += _ratio_table("Ratios (median / median)", models, ratios,
                          lambda c: f"{c:.2f}")
    within = [(f"{CONTENDERS[a]} / {CONTENDERS[b]}",
               [models[label].get("ratios_within_rounds", {}).get(key) for label in models])
              for key, a, b in RATIOS]
    lines += _ratio_table("Ratios within each round (median over rounds, and min–max)", models,
                          within, lambda c: f"{c['median']:.2f} ({c['min']:.2f}–{c['max']:.2f})")
    rows = next(iter(models.values()))["accuracy_rows"]
    lines += [f"train acc: accuracy on the first {rows} training images after the epochs "
              "each contender ran, a check that all of them train (the GEMM floors train "
              "nothing)."]

    t98 = result.get("time_to_98")
    if t98 and "epochs" in t98:
        c = t98["config"]
        lines += ["", f"### Time to 98% test accuracy, default recipe (784-"
                      f"{'-'.join(map(str, c['hidden']))}-10, {c['optimizer']} lr {c['lr']} "
                      f"{c['schedule']}, momentum {c['momentum']}, batch {c['batch_size']}, "
                      f"{c['epochs']} epochs max)", ""]
        if t98["reached"]:
            lines.append(f"98% reached after {t98['epochs_to_98']} epochs: "
                         f"**{t98['seconds_to_98']:.1f} s** of training")
        else:
            lines.append(f"98% not reached in {len(t98['epochs'])} epochs; best test accuracy "
                         f"{t98['best_test_accuracy']:.2%}")
        lines += ["", "| epoch | train s | cumulative s | test acc |", "|---:|---:|---:|---:|"]
        lines += [f"| {e['epoch']} | {e['seconds']:.2f} | {e['cumulative_seconds']:.2f} | "
                  f"{e['test_accuracy']:.2%} |" for e in t98["epochs"]]
    elif t98:
        lines += ["", f"Time to 98%: {t98.get('skipped') or t98.get('error')}"]

    lines += _format_cnn(result.get("cnn"))
    gpu = result.get("gpu")
    if gpu:
        lines += _format_gpu(gpu)
    return "\n".join(lines)


def _ratio_table(title: str, models: dict, rows: list, fmt) -> list:
    """A ratio table with a row for each ratio that some model has, or nothing at all (a run of
    one contender has no ratios)."""
    rows = [(name, cells) for name, cells in rows if any(c is not None for c in cells)]
    if not rows:
        return []
    return (["### " + title, "", "| ratio | " + " | ".join(models) + " |",
             "|---|" + "---:|" * len(models)]
            + [f"| {name} | " + " | ".join("–" if c is None else fmt(c) for c in cells) + " |"
               for name, cells in rows] + [""])


def _format_cnn(cnn) -> list:
    if not cnn:
        return []
    if "contenders" not in cnn:
        return ["", f"Small CNN: {cnn.get('skipped') or cnn.get('error')}"]
    lines = ["", f"### Small CNN (gpunet.small_cnn), batch {cnn['batch_size']}: median of "
                 f"{len(cnn['order_per_round'])} samples of {cnn['steps_per_sample']} steps; an "
                 f"epoch is {cnn['steps_per_epoch']} steps", "",
             "| contender | ms/step | s/epoch | × gpunet |", "|---|---:|---:|---:|"]
    ours = cnn["contenders"]["gpunet"].get("median_ms_per_step")
    for entry in cnn["contenders"].values():
        ms = entry.get("median_ms_per_step")
        if ms is None:
            lines.append(f"| {entry['name']} | {entry['status']} | | |")
            continue
        lines.append(f"| {entry['name']} | {ms:.1f} | {entry['epoch_seconds']:.1f} | "
                     f"{'–' if not ours else f'{ms / ours:.2f}'} |")
    within = cnn.get("gpunet/torch_within_rounds")
    said = []
    if "gpunet/torch" in cnn:
        said.append(f"gpunet / torch eager: **{cnn['gpunet/torch']:.2f}** (within rounds "
                    f"{within['median']:.2f}, {within['min']:.2f}–{within['max']:.2f})")
    if "conv_gemm_share" in cnn:
        said.append(f"the convolutions' products alone take {cnn['conv_gemm_share']:.0%} of "
                    f"gpunet's step")
    if "gpunet/floor" in cnn:
        said.append(f"all of its products {1 / cnn['gpunet/floor']:.0%}")
    return lines + (["", "; ".join(said) + "."] if said else [])


def _machine_line(result: dict) -> str:
    m, v, t = result["machine"], result["versions"], result["threads"]
    blas = t.get("numpy_blas")
    blas = f"{blas.get('name')} {blas.get('version')}" if isinstance(blas, dict) else "BLAS ?"
    torch = f"torch {v['torch']} ({t['torch_num_threads']} threads)" \
        if "torch_num_threads" in t else "no torch"
    load = m.get("load_average_at_start")
    load = f"; load average {load[0]:.2f} at start" if load else ""
    return (f"{m.get('cpu_model') or m.get('processor') or m['machine']}, {m['cpu_count']} CPUs; "
            f"python {v['python']}, numpy {v['numpy']} ({blas}), {torch}{load}")


def _format_gpu(gpu: dict) -> list:
    lines = ["", "### Launch overhead (GPU)", ""]
    launch = gpu.get("empty_launch", {})
    if "seconds" in launch:
        lines.append(f"empty kernel launch (CuPy RawKernel, host side): "
                     f"{launch['seconds'] * 1e6:.2f} µs")
    else:
        lines.append(f"empty kernel launch: {launch.get('error')}")
    rows = [(label, CONTENDERS[k], v) for label, d in gpu.get("launch_floor", {}).items()
            for k, v in d.items()]
    if rows:
        lines += ["", "| model | contender | kernels/step | device ops/step | launch floor s/epoch "
                      "| median s/epoch | median / floor |", "|---|---|---:|---:|---:|---:|---:|"]
        for label, name, v in rows:
            ratio = v["median_over_launch_floor"]
            lines.append(f"| {label} | {name} | {v['kernels_per_step']:.1f} | "
                         f"{v['device_ops_per_step']:.1f} | {v['launch_floor_seconds']:.4f} | "
                         f"{v['median_seconds'] or 0:.4f} | "
                         f"{'–' if ratio is None else f'{ratio:.2f}'} |")
    ce = gpu.get("cross_entropy", {})
    if "rows" in ce:
        bw = ce.get("copy_bandwidth", {})
        lines += ["", "### Fused cross-entropy forward+backward (GPU)", "",
                  "device-to-device copy: " + (f"{bw['gb_per_s']:.0f} GB/s (read + write of "
                                               f"{bw['bytes'] / 2 ** 31:g} GiB)"
                                               if "gb_per_s" in bw else str(bw.get("error"))), "",
                  "| shape | dtype | gpunet µs | gpunet GB/s | torch F.cross_entropy µs "
                  "| torch GB/s |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in ce["rows"]:
            g, t = r.get("gpunet", {}), r.get("torch", {})
            lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['dtype']} | "
                         f"{_kernel_cells(g)} | {_kernel_cells(t)} |")
        launches = ce.get("launches_128x10", {})
        if "per_call" in launches:
            p = launches["per_call"]
            lines.append(f"\nfused CE at (128, 10): {p['kernels']:.1f} kernels, "
                         f"{p['memcpy'] + p['memset']:.1f} memcpy/memset per call")
        lines.append("GB/s counts the logits read once, the gradient written once and the labels, "
                     "for both; torch also writes its log-softmax.")
    elif ce:
        lines.append(f"\ncross-entropy benchmark: {ce.get('error')}")
    relu = gpu.get("relu_backward", {})
    if "rows" in relu:
        lines += ["", "### ReLU backward with the bias gradient, float32 (GPU)", "",
                  "| shape | groups of rows | µs | GB/s | one group µs | one group GB/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in relu["rows"]:
            g, one = r.get("planned", {}), r.get("one group", {})
            lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['groups']} | "
                         f"{_kernel_cells(g)} | {_kernel_cells(one)} |")
        lines.append("GB/s counts y and dy read and dz written once.")
    elif relu:
        lines.append(f"\nReLU backward benchmark: {relu.get('error')}")
    return lines


def _kernel_cells(d) -> str:
    """A kernel's time (µs) and bandwidth (GB/s) cells, or its error in both."""
    return f"{_cell(d, 'seconds', 1e6)} | {_cell(d, 'gb_per_s')}"


def _cell(d, key, scale=1.0):
    if not d or key not in d:
        return (d or {}).get("error", "–")[:40] if d else "–"
    return f"{d[key] * scale:.1f}"


def _fmt_kernel(d) -> str:
    if not d:
        return "–"
    return f"{d['seconds'] * 1e6:.1f} µs" if "seconds" in d else d.get("error", "?")
