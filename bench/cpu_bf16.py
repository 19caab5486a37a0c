"""fp32 vs bf16 autocast training steps of the default model on this CPU, side by side.

    .venv/bin/python bench/cpu_bf16.py

Same model (conf/model/default.yaml), batch 64, channels-last, AdamW; 5 warm-up steps then 20 timed
steps, alternating fp32, bf16, fp32, bf16 so that drift hits both sides. Prints whether torch sees
AMX / AVX512-BF16: without them bf16 is emulated. Decides `train.amp`'s CPU default (README).
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.model import VAE, negative_elbo  # noqa: E402


def images_per_second(bf16: bool, steps: int = 20, warmup: int = 5, batch: int = 64) -> float:
    torch.manual_seed(0)
    model = VAE().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 2e-3)
    x = torch.rand(batch, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, mu, logvar = model(x)
        loss = negative_elbo(x, out, mu, logvar)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def main():
    print(f"AMX: {torch.cpu._is_amx_tile_supported()}, AVX512-BF16: {torch.cpu._is_avx512_bf16_supported()}, "
          f"{torch.get_num_threads()} threads")
    for bf16 in (False, True, False, True):
        print(f"{'bf16 autocast' if bf16 else 'fp32'}: {images_per_second(bf16):.0f} img/s")


if __name__ == "__main__":
    main()
