"""Do compiled fp8 training grads equal eager ones on CUDA? Prints grad norms per backend and
exits 1 if any compiled weight/input gradient is zero or differs from eager (SQNR < 40 dB).

torch 2.11 gave all-zero compiled grads while the fp8 matmul was an autograd.Function; it is
now the op lowbit::float8_train_mm_v2 with a registered backward.
"""
import math
import sys

import torch

from lowbit.training.float8_linear import Float8TrainingLinear


def sqnr(ref, got):
    noise = (ref.double() - got.double()).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.double().pow(2).mean().item() / noise)


failed = []
for recipe in ["tensorwise", "rowwise", "rowwise_with_gw_hp"]:
    for x_grad in [True, False]:
        ref = None
        for backend in ["eager", "aot_eager", "inductor"]:
            torch.manual_seed(0)
            torch._dynamo.reset()
            lin = Float8TrainingLinear(512, 256, recipe=recipe, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(4, 128, 512, device="cuda", dtype=torch.bfloat16, requires_grad=x_grad)
            f = lin if backend == "eager" else torch.compile(lin, backend=backend, fullgraph=True)
            for _ in range(2):
                lin.zero_grad()
                x.grad = None
                y = f(x)
                y.float().square().sum().backward()
            grads = (lin.weight.grad.float(), x.grad.float() if x_grad else None)
            if ref is None:
                ref = grads
            db = [sqnr(r, g) for r, g in zip(ref, grads) if r is not None]
            ok = all(d > 40 for d in db) and float(grads[0].norm()) > 0
            if not ok:
                failed.append((recipe, backend, x_grad))
            print(f"{recipe:20s} {backend:9s} x.requires_grad={x_grad!s:5s} "
                  f"y {float(y.float().norm()):9.3f} gw {float(grads[0].norm()):9.3f} "
                  f"SQNR vs eager (gw, gx) {[round(d, 1) for d in db]} {'ok' if ok else 'FAIL'}",
                  flush=True)
print("FAILED:", failed if failed else "none")
sys.exit(1 if failed else 0)
