"""Peers for BENCHMARKS.md, timed in the same run as longctx's kernels.

Measures the device's ceilings (device-to-device copy bandwidth, bf16 matmul TFLOP/s) and
eager PyTorch RoPE the way HF transformers applies it (`apply_rotary_pos_emb`: q*cos +
rotate_half(q)*sin) at the sweep's shapes. CUDA-event timing, median of many runs, random
inputs.
"""
import statistics

import torch


def time_ms(fn, warmup=5, iters=50):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def ceilings():
    n = 1 << 28  # 1 GiB of f32
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters=20)
    copy = 2 * n * 4 / (ms * 1e-3)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms_mm = time_ms(lambda: a @ b, iters=20)
    tflops = 2 * 8192**3 / (ms_mm * 1e-3) / 1e12
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"ceiling: copy {copy / 1e9:.0f} GB/s (read + write), bf16 matmul 8192^3 {tflops:.0f} TFLOP/s")
    return copy


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def hf_apply(q, k, cos, sin):
    # HF's apply_rotary_pos_emb with unsqueeze_dim=1: cos/sin [b, t, d] -> [b, 1, t, d].
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope_peers(copy):
    print("\neager PyTorch RoPE (HF apply_rotary_pos_emb), bf16, cos/sin precomputed")
    print(f"{'shape':<18} {'tokens':>8} {'time (us)':>10} {'GB/s*':>8} {'% copy':>8}")
    shapes = [("llama3-8b", 32, 8, 128, 500000.0), ("deepseek-v3-rope", 128, 1, 64, 10000.0)]
    for name, hq, hk, d, base in shapes:
        for t in [1024, 4096, 16384, 65536, 131072]:
            q = torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, hk, t, d, device="cuda", dtype=torch.bfloat16)
            inv = 1.0 / (base ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d))
            pos = torch.arange(t, device="cuda", dtype=torch.float32)
            freqs = torch.outer(pos, inv)
            emb = torch.cat((freqs, freqs), dim=-1)[None]
            cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
            ms = time_ms(lambda: hf_apply(q, k, cos, sin))
            # Same byte count as longctx's in-place kernel (read + write of every rotated
            # element), so the GB/s columns compare times directly.
            nbytes = 2 * t * (hq + hk) * d * 2
            gbs = nbytes / (ms * 1e-3) / 1e9
            print(f"{name:<18} {t:>8} {ms * 1e3:>10.1f} {gbs:>8.0f} {100 * gbs * 1e9 / copy:>7.1f}%")
    print("* bytes counted as longctx's in-place minimum, so GB/s is comparable across rows")


if __name__ == "__main__":
    c = ceilings()
    rope_peers(c)
