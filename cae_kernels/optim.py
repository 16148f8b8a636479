"""``Adam``: ``torch.optim.Adam`` whose step is one op, ``adam_`` (``cae_kernels.functional``).

On CUDA the whole step -- every parameter's update, the step counts and the gradients'
2-norm, which training logs -- is one kernel launch, where PyTorch's fused Adam and
``get_total_norm`` launch about five. The state (``step``, ``exp_avg``, ``exp_avg_sq``) and
``state_dict`` are ``torch.optim.Adam``'s, so checkpoints load into either. Groups the op
does not serve (amsgrad, maximize, differentiable, sparse or non-float32 gradients,
parameters on several devices, gradients strided unlike their parameters) make the whole
step ``torch.optim.Adam``'s own.
"""

from __future__ import annotations

import torch

from . import functional

__all__ = ["Adam"]


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` (same arguments) stepped by ``adam_``; ``functions`` is the op
    namespace's functions (``cae_kernels.functional`` by default; a model's ``functions``,
    e.g. the emulator's). After ``step()``, ``grad_norm`` is the 2-norm of the gradients it
    read (a 0-d tensor on the parameters' device; None where torch's step ran)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, functions=None,
                 **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        self.functions = functions if functions is not None else functional
        self.grad_norm: torch.Tensor | None = None
        self._lr_tensors: dict[int, tuple[float, torch.Tensor]] = {}

    def _served(self, group, params) -> bool:
        if group["amsgrad"] or group["maximize"] or group["differentiable"]:
            return False
        devices = {p.device for p in params}
        # the op takes each gradient strided as its parameter
        return len(devices) == 1 and all(
            p.dtype == torch.float32 and not p.grad.is_sparse and p.grad.stride() == p.stride() for p in params)

    def _lr(self, index, group, device) -> torch.Tensor:
        """The group's learning rate as the op reads it: its own tensor, or a device tensor
        made again only when the number changes (no copy per step)."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return lr if lr.device == device and lr.dtype == torch.float32 else lr.to(device, torch.float32)
        value, cached = self._lr_tensors.get(index, (None, None))
        if cached is None or cached.device != device or value != lr:
            cached = torch.tensor(lr, dtype=torch.float32, device=device)
            self._lr_tensors[index] = (lr, cached)
        return cached

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [(index, group, [p for p in group["params"] if p.grad is not None])
                  for index, group in enumerate(self.param_groups)]
        groups = [(index, group, params) for index, group, params in groups if params]
        if not all(self._served(group, params) for _, group, params in groups):
            self.grad_norm = None
            super().step()
            return loss
        norms = []
        for index, group, params in groups:
            device = params[0].device
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != device or state["step"].dtype != torch.float32:
                    state["step"] = state["step"].to(device=device, dtype=torch.float32)  # a loaded checkpoint's
            states = [self.state[p] for p in params]
            norms.append(self.functions.adam_(
                params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states], self._lr(index, group, device), group["betas"], group["eps"],
                group["weight_decay"]))
        self.grad_norm = (None if not norms else norms[0] if len(norms) == 1
                          else torch.linalg.vector_norm(torch.stack(norms)))
        return loss
