"""Does torch's float32 ``eigh`` give the same bits on one thread as on two? (A probe: ADMM's eigendecomposition
runs on one thread since issue 32, and its masks moved with it.)

    python benchmarks/eigh_threads_probe.py
"""

from __future__ import annotations

import torch


def main() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6144, 1536, generator=g) @ torch.randn(1536, 1536, generator=g) / 40
    h = (x.T @ x).float()  # a Gram of SmolLM2's down_proj input size
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = torch.linalg.eigh(h)
        torch.set_num_threads(1)
        one = torch.linalg.eigh(h)
    finally:
        torch.set_num_threads(before)
    print(f"eigenvalues equal: {torch.equal(two[0], one[0])}; eigenvectors equal: {torch.equal(two[1], one[1])}; "
          f"largest eigenvector entry difference (up to sign): {float((two[1].abs() - one[1].abs()).abs().max()):.4f}")


if __name__ == "__main__":
    main()
