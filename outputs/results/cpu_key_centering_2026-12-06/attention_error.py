"""Offline: attention output error of int2/int4 per-token keys (the eviction stores' format) with and without
per-channel centering (mean over the prompt subtracted, exact under softmax), with Hadamard rotation, vs KIVI
per-channel keys; on SmolLM2, a long prompt's last 64 queries over the first N-64 keys."""
import sys, torch
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[3]))
import runner
from model import apply_rope
from kernels.quantize import quantize_block, dequantize_block
from kv_cache.rotation import rotation_matrix
from scripts.cpu_peers_speed import gguf_path
torch.set_num_threads(1)
m = runner.load_model(gguf_path(), torch.device('cpu'), torch.float32)
from tokenizer import load_tokenizer
tok = load_tokenizer(gguf_path())
text = open('/work/main/README.md').read() + open('/work/main/docs/results.md').read()
ids = tok.encode(text)[:1024]
N = len(ids)
runner.setup_cache(m, 'full', {}, batch_size=1, max_seq_length=N + 4)
rec = []
for layer in m.layers:
    c = layer.attention.kv_cache
    orig = c.forward
    def hook(q, k, v, input_pos, cos, sin, rows=None, orig=orig):
        rec.append((q, k, v, input_pos, cos, sin))
        return orig(q, k, v, input_pos, cos, sin, rows)
    c.forward = hook
with torch.no_grad():
    runner.prefill(m, torch.tensor([ids]))
H = m.args.n_head; Hk = m.args.n_kv_head; D = m.args.head_dim
R = rotation_matrix('hadamard', D, torch.float32, 'cpu')
def attn(q, k, v):
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, 1); v = v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) / D ** 0.5
    return torch.softmax(s.double(), -1).float() @ v
def fq(x, bits, axis):
    n = x.shape[2] // 32 * 32
    x = x[:, :, :n]
    p, s, z = quantize_block(x, bits, axis, 32)
    return dequantize_block(p, s, z, bits, axis, 32, D, torch.float32)
res = {}
for li, (q, k, v, pos, cos, sin) in enumerate(rec):
    cq, sq = cos[pos], sin[pos]
    # rope as the cache applies it
    from kv_cache.base import rope_at
    c_, s_ = rope_at(pos, cos, sin)
    q = apply_rope(q, c_, s_); k = apply_rope(k, c_, s_)
    Q = q[:, :, -64:]; n = (N - 64) // 32 * 32
    K, V = k[:, :, :n], v[:, :, :n]
    ref = attn(Q, K, V)
    mu_k = K.mean(2, keepdim=True); mu_v = V.mean(2, keepdim=True); g = H // Hk; mu_vq = mu_v.repeat_interleave(g, 1)
    for bits in ('2', '4'):
        cases = {
          'tok_rot_kv': (attn(Q @ R, fq(K @ R, bits, 'token'), fq(V @ R, bits, 'token')) @ R.T),
          'tok_rot_kv_center_k': (attn(Q @ R, fq((K - mu_k) @ R, bits, 'token'), fq(V @ R, bits, 'token')) @ R.T),
          'tok_rot_kv_center_kv': (attn(Q @ R, fq((K - mu_k) @ R, bits, 'token'), fq((V - mu_v) @ R, bits, 'token')) @ R.T + mu_vq),
          'tok_norot_center_k': attn(Q, fq(K - mu_k, bits, 'token'), fq(V, bits, 'token')),
          'chan_rotk': attn(Q @ R, fq(K @ R, bits, 'channel'), fq(V, bits, 'token')),
          'chan_rotk_center_v': attn(Q @ R, fq(K @ R, bits, 'channel'), fq(V - mu_v, bits, "token")) + mu_vq,
        }
        Kr = (K - mu_k) @ R
        sd = Kr.std(2, keepdim=True).clamp_min(1e-6)
        cases['tok_rot_center_norm_k'] = attn(Q @ R * sd.repeat_interleave(g, 1), fq(Kr / sd, bits, 'token'), fq(V @ R, bits, 'token')) @ R.T
        Kr0 = K @ R
        sd0 = Kr0.abs().amax(2, keepdim=True).clamp_min(1e-6)
        cases['tok_rot_absmax_k'] = attn(Q @ R * sd0.repeat_interleave(g, 1), fq(Kr0 / sd0, bits, 'token'), fq(V @ R, bits, 'token')) @ R.T
        # static per-channel: one scale/zero per channel over the whole prompt
        nn_ = K.shape[2]
        def fq_static(x):
            lo = x.amin(2, keepdim=True); hi = x.amax(2, keepdim=True)
            levels = 2 ** int(bits) - 1
            sc = (hi - lo).clamp_min(1e-8) / levels
            return torch.round((x - lo) / sc).clamp(0, levels) * sc + lo
        cases['chan_static_rotk'] = attn(Q @ R, fq_static(K @ R), fq(V, bits, 'token'))
        cases['chan_static_norot'] = attn(Q, fq_static(K), fq(V, bits, 'token'))
        for name, out in cases.items():
            err = ((out - ref).norm() / ref.norm()).item()
            res.setdefault((bits, name), []).append(err)
for (bits, name), errs in res.items():
    print(f"int{bits} {name:24s} mean rel err {sum(errs)/len(errs):.4f}  max {max(errs):.4f}")
