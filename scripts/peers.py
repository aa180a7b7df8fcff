"""Peers for BENCHMARKS.md, timed in the same run as longctx's kernels.

Measures the device's ceilings (device-to-device copy bandwidth, bf16 matmul TFLOP/s) and
eager PyTorch RoPE the way HF transformers applies it (`apply_rotary_pos_emb`: q*cos +
rotate_half(q)*sin) at the sweep's shapes. CUDA-event timing, median of many runs, random
inputs.
"""
import math
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


def attention_peers():
    """PyTorch scaled_dot_product_attention at the sweep's attention shapes (16k tokens per
    batch), flash and cuDNN backends, GQA through enable_gqa; FLOPs counted as longctx
    counts them (exact for the causal mask)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("\nPyTorch SDPA, bf16, [batch, heads, seqlen, dim], 16k tokens per batch")
    print(f"{'shape':<16} {'mask':>6} {'seqlen':>7} {'batch':>5} {'backend':>18} {'time (ms)':>10} {'TFLOP/s':>8}")
    shapes = [("mha-d64", 32, 32, 64), ("mha-d128", 16, 16, 128), ("llama3-8b-gqa", 32, 8, 128)]
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    for name, hq, hkv, d in shapes:
        for causal in (False, True):
            for n in [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]:
                b = max(1, 16384 // n)
                q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
                v = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
                pairs = n * (n + 1) // 2 if causal else n * n
                flops = 2 * hq * b * pairs * 2 * d
                for bname, backend in backends:
                    for expand in ([False, True] if hq != hkv else [False]):
                        kk, vv = (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)) if expand else (k, v)
                        label = bname + (" (kv expanded)" if expand else (" enable_gqa" if hq != hkv else ""))
                        try:
                            with sdpa_kernel(backend):
                                fn = lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=(hq != hkv and not expand))
                                ms = time_ms(fn, warmup=3, iters=10)
                        except Exception as e:  # a backend that rejects the shape
                            print(f"{name:<16} {('causal' if causal else 'none'):>6} {n:>7} {b:>5} {label:>18} unavailable: {type(e).__name__}")
                            continue
                        print(f"{name:<16} {('causal' if causal else 'none'):>6} {n:>7} {b:>5} {label:>18} {ms:>10.3f} {flops / (ms * 1e-3) / 1e12:>8.1f}")
                        if not expand:
                            break
                del q, k, v
                torch.cuda.empty_cache()



def decode_peers(copy):
    """Decode peers at the sweep's decode shapes: PyTorch SDPA (flash, cuDNN, efficient and
    math backends; the best one that accepts the shape is the peer) over a dense copy of the
    cache, one query token per sequence, [batch, heads, 1, d] against [batch, heads_kv,
    context, d]; and, as the form engines use when SDPA cannot take GQA, the KV heads
    expanded. Bytes as longctx counts them (dense K and V read once, Q read, O written)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("\nPyTorch SDPA decode over a dense bf16 cache (one query token per sequence)")
    print(f"{'shape':<12} {'batch':>5} {'context':>8} {'backend':>22} {'time (us)':>10} {'GB/s':>8} {'% copy':>8}")
    backends = [
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("math", SDPBackend.MATH),
    ]
    shapes = [("llama3-8b", 32, 8, 128), ("hd512-mqa8", 8, 1, 512)]
    cases = [(1, 1024), (1, 32768), (1, 131072), (8, 32768), (8, 131072), (64, 4096), (64, 32768)]
    for name, hq, hkv, d in shapes:
        for b, n in cases:
            q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
            nbytes = 2 * b * hkv * n * d * 2 + 2 * b * hq * d * 2
            for bname, backend in backends:
                for gqa in ([True, False] if hq != hkv else [False]):
                    label = bname + (" enable_gqa" if gqa else (" kv expanded" if hq != hkv else ""))
                    try:
                        kk, vv = (k, v) if (gqa or hq == hkv) else (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))
                        with sdpa_kernel(backend):
                            fn = lambda: F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa)
                            ms = time_ms(fn, warmup=3, iters=20)
                    except Exception as e:  # a backend that rejects the shape, or out of memory
                        print(f"{name:<12} {b:>5} {n:>8} {label:>22} unavailable: {type(e).__name__}")
                        continue
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    print(f"{name:<12} {b:>5} {n:>8} {label:>22} {ms * 1e3:>10.1f} {gbs:>8.0f} {100 * gbs * 1e9 / copy:>7.1f}%")
            del q, k, v
            torch.cuda.empty_cache()


def extend_peers():
    """Chunked-prefill peers at the sweep's extend shapes: PyTorch SDPA with a bottom-right
    causal mask (torch.nn.attention.bias.causal_lower_right) for a chunk of new queries over
    a dense copy of the cache, flash / cuDNN / efficient backends, GQA through enable_gqa;
    FLOPs counted as longctx counts them."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        from torch.nn.attention.bias import causal_lower_right
    except ImportError:
        print("\nextend peers: this torch has no causal_lower_right; skipped")
        return
    print("\nPyTorch SDPA chunked prefill (bottom-right causal), bf16, llama3-8b heads (d 128) and hd512-mqa8 (8 / 1 heads, d 512)")
    print(f"{'model':<11} {'batch':>5} {'context':>8} {'new':>6} {'backend':>22} {'time (ms)':>10} {'TFLOP/s':>8}")
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)]
    cases = [("llama3-8b", 32, 8, 128, b, c, n) for b, c, n in [(1, 8192, 1024), (1, 32768, 2048), (4, 32768, 512), (1, 131072, 4096)]]
    cases += [("hd512-mqa8", 8, 1, 512, b, c, n) for b, c, n in [(1, 8192, 1024), (1, 32768, 2048)]]
    for model, hq, hkv, d, b, c, n in cases:
        q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, hkv, c, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, hkv, c, d, device="cuda", dtype=torch.bfloat16)
        pairs = n * (c - n) + n * (n + 1) // 2
        flops = 4 * d * hq * b * pairs
        mask = causal_lower_right(n, c)
        # The math backend materialises the scores: only at d 512, where flash and cuDNN
        # may refuse the head dim.
        for bname, backend in [x for x in backends if x[0] != "math" or d == 512]:
            for gqa in (True, False):
                label = bname + (" enable_gqa" if gqa else " kv expanded")
                try:
                    kk, vv = (k, v) if gqa else (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))
                    with sdpa_kernel(backend):
                        fn = lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=gqa)
                        ms = time_ms(fn, warmup=3, iters=10)
                except Exception as e:
                    print(f"{model:<11} {b:>5} {c:>8} {n:>6} {label:>22} unavailable: {type(e).__name__}")
                    continue
                print(f"{model:<11} {b:>5} {c:>8} {n:>6} {label:>22} {ms:>10.3f} {flops / (ms * 1e-3) / 1e12:>8.1f}")
        del q, k, v
        torch.cuda.empty_cache()


def mla_peers(copy):
    """MLA decode peer at the sweep's MLA shapes: PyTorch's absorbed form over a dense copy
    of the latent cache (the batched matmuls and softmax an engine without a fused kernel
    runs): scores = q_lat [b, h, 576] x latent [b, ctx, 576]^T, softmax, o_lat = P x
    latent[..., :512]; bf16, one query token; bytes and FLOPs as longctx counts them."""
    print("\nPyTorch absorbed MLA decode over a dense bf16 latent cache (DeepSeek-V3 dims)")
    print(f"{'heads':>5} {'batch':>5} {'context':>8} {'time (us)':>10} {'GB/s':>8} {'% copy':>8} {'TFLOP/s':>8}")
    scale = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2
    for heads in (128, 16):
        for b, c in [(1, 4096), (1, 65536), (8, 16384), (32, 16384), (128, 4096), (128, 16384)]:
            q = torch.randn(b, heads, 576, device="cuda", dtype=torch.bfloat16)
            lat = torch.randn(b, c, 576, device="cuda", dtype=torch.bfloat16)

            def fn():
                s = torch.bmm(q, lat.transpose(1, 2)).float() * scale
                p = torch.softmax(s, dim=-1).to(torch.bfloat16)
                return torch.bmm(p, lat[:, :, :512])

            try:
                ms = time_ms(fn, warmup=3, iters=20)
            except Exception as e:
                print(f"{heads:>5} {b:>5} {c:>8} unavailable: {type(e).__name__}")
                continue
            nbytes = b * c * 1152 + b * heads * (576 + 512) * 2
            flops = 2 * heads * 1088 * b * c
            gbs = nbytes / (ms * 1e-3) / 1e9
            print(f"{heads:>5} {b:>5} {c:>8} {ms * 1e3:>10.1f} {gbs:>8.0f} {100 * gbs * 1e9 / copy:>7.1f}% {flops / (ms * 1e-3) / 1e12:>8.1f}")
            del q, lat
            torch.cuda.empty_cache()


def attention_backward_peers():
    """PyTorch SDPA backward (forward run once, then the timed backward of the same graph)
    at the backward sweep's shapes, flash and cuDNN backends; FLOPs 2.5 x the forward's
    exact count, as the sweep counts them."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("\nPyTorch SDPA backward, bf16, [batch, heads, seqlen, dim], 16k tokens per batch")
    print(f"{'shape':<16} {'mask':>6} {'seqlen':>7} {'batch':>5} {'backend':>18} {'time (ms)':>10} {'TFLOP/s':>8}")
    shapes = [("mha-d64", 32, 32, 64, 64), ("mha-d128", 16, 16, 128, 128), ("llama3-8b-gqa", 32, 8, 128, 128),
              ("mla-192-128", 16, 16, 192, 128)]
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    for name, hq, hkv, d, dv in shapes:
        for causal in (False, True):
            for n in [1024, 2048, 4096, 8192, 16384, 32768]:
                b = max(1, 16384 // n)
                mk = lambda h, dim: torch.randn(b, h, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                q, k, v = mk(hq, d), mk(hkv, d), mk(hkv, dv)
                pairs = n * (n + 1) // 2 if causal else n * n
                flops = 2.5 * 2 * hq * b * pairs * (d + dv)
                for bname, backend in backends:
                    label = bname + (" enable_gqa" if hq != hkv else "")
                    try:
                        with sdpa_kernel(backend):
                            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=(hq != hkv))
                            grad = torch.randn_like(out)
                            fn = lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
                            ms = time_ms(fn, warmup=3, iters=10)
                    except Exception as e:  # a backend that rejects the shape
                        print(f"{name:<16} {('causal' if causal else 'none'):>6} {n:>7} {b:>5} {label:>18} unavailable: {type(e).__name__}")
                        continue
                    print(f"{name:<16} {('causal' if causal else 'none'):>6} {n:>7} {b:>5} {label:>18} {ms:>10.3f} {flops / (ms * 1e-3) / 1e12:>8.1f}")
                    del out
                del q, k, v
                torch.cuda.empty_cache()

def hf_mixtral_router(logits, k, renorm):
    # HF Mixtral / Qwen-MoE: softmax in f32, top-k, renormalise (Qwen: iff norm_topk_prob).
    w = torch.softmax(logits, dim=1, dtype=torch.float)
    w, sel = torch.topk(w, k, dim=-1)
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return sel, w


def hf_deepseek_v3_router(logits, bias, k, n_group, topk_group, scale):
    # HF DeepseekV3TopkRouter after its linear: sigmoid, biased choice, group top-2 sums,
    # topk_group groups, masked top-k, unbiased weights renormalised and scaled.
    t, e = logits.shape
    scores = logits.sigmoid()
    choice = scores + bias.unsqueeze(0)
    group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    choice = choice.masked_fill(~score_mask.bool(), 0.0)
    sel = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    w = scores.gather(1, sel)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * scale
    return sel, w


def moe_peers(copy):
    print("\neager PyTorch MoE routing (HF routers; permutation, gather and combine as index ops), f32 logits, bf16 hidden")
    print(f"{'shape':<14} {'op':>8} {'tokens':>8} {'time (us)':>10} {'GB/s*':>8} {'% copy':>8}")
    shapes = [("mixtral-8x7b", 8, 2, 4096, None), ("qwen3-moe", 128, 8, 4096, None), ("deepseek-v3", 256, 8, 7168, (8, 4, 2.5))]
    for name, e, k, h, groups in shapes:
        for t in [1024, 4096, 16384, 65536, 131072]:
            logits = torch.rand(t, e, device="cuda", dtype=torch.float32) * 6 - 3
            if groups is None:
                gate = lambda: hf_mixtral_router(logits, k, True)
            else:
                bias = (torch.rand(e, device="cuda") * 16 - 8).round() / 64
                gate = lambda: hf_deepseek_v3_router(logits, bias, k, groups[0], groups[1], groups[2])
            sel, w = gate()
            flat = sel.reshape(-1)

            def permute():
                order = torch.sort(flat, stable=True)[1]
                counts = torch.bincount(flat, minlength=e)
                return order, counts, torch.cumsum(counts, 0)

            order = permute()[0]
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            xp = x.index_select(0, order // k)
            slot_of = torch.empty_like(order)
            slot_of[order] = torch.arange(order.numel(), device="cuda")
            wb = w.to(torch.bfloat16).unsqueeze(-1)
            combine = lambda: (xp.index_select(0, slot_of).view(t, k, h) * wb).sum(1)
            a = t * k
            for op, fn, nbytes in [
                ("gate", gate, t * (e * 4 + k * 8)),
                ("permute", permute, a * 12),
                ("gather", lambda: x.index_select(0, order // k), 2 * a * h * 2),
                ("combine", combine, (a + t) * h * 2),
            ]:
                ms = time_ms(fn, warmup=3, iters=20)
                gbs = nbytes / (ms * 1e-3) / 1e9
                print(f"{name:<14} {op:>8} {t:>8} {ms * 1e3:>10.1f} {gbs:>8.0f} {100 * gbs * 1e9 / copy:>7.1f}%")
            del logits, x, xp
            torch.cuda.empty_cache()
    print("* bytes counted as longctx's minimum for the same op, so GB/s is comparable across rows")


if __name__ == "__main__":
    import sys

    c = ceilings()
    if "--moe" in sys.argv:  # only the MoE peers
        moe_peers(c)
        raise SystemExit(0)
    if "--mla" in sys.argv:  # only the MLA peer
        mla_peers(c)
        raise SystemExit(0)
    if "--decode" in sys.argv:  # only the decode and prefill-over-cache peers
        decode_peers(c)
        extend_peers()
        raise SystemExit(0)
    rope_peers(c)
    attention_peers()
    attention_backward_peers()
    decode_peers(c)
    extend_peers()
    mla_peers(c)
    moe_peers(c)
