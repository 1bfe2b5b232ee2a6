"""Heads on a policy's features: value, Q and policy heads (:class:`ValueHead`), with optional PCA whitening of
their input."""

from __future__ import annotations

import math

import torch
from torch import nn

from rllama.errors import RLlamaError


def pca_whitening(x: torch.Tensor, k: int, floor: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [H], basis [H, k])`` such that ``(x - mean) @ basis`` holds the top ``k`` principal
    components of the rows of ``x``, each at variance ``1/k``; directions with less than ``floor``
    times the largest variance get a zero column. Computed in ``x``'s dtype (see
    :meth:`ValueHead.fit_whitening`)."""
    mean = x.mean(0)
    variances, directions = torch.linalg.eigh((x - mean).T @ (x - mean) / len(x))
    variances, directions = variances.flip(0)[:k], directions.flip(1)[:, :k]
    kept = variances > float(variances[0]) * floor
    return mean, torch.where(kept, directions / variances.clamp(min=1e-30).sqrt(), 0.0) / math.sqrt(k)


class ValueHead(nn.Module):
    """Scalar head on a hidden state, computed in float32.

    The hidden state is layer-normalised (no learned scale) and divided by ``sqrt(hidden_size)``
    first, so the head's input has unit norm whatever the model: a language model's final hidden
    states have norms of 40 or more, and on those one AdamW step at the head's learning rate moves
    the value by about 0.5, which kept the critic from fitting at all (explained variance about 0 on
    Blackjack; see ``docs/algorithms.md``). Starts at zero output so the first advantages are the
    plain returns.

    With ``whiten=k`` the head reads the input's top ``k`` principal components, each scaled to unit
    variance (PCA whitening), fitted once by :meth:`fit_whitening` from inputs the head will see;
    until then it outputs its bias. A language model's features are badly conditioned for a linear
    head trained by gradient steps: on Blackjack the directions that tell the states apart carry a
    millionth of the variance of the first one, so a head on raw features learns "always stick"
    while one on whitened features learns the state-dependent policy (``docs/algorithms/dqn.md``).
    """

    def __init__(self, hidden_size: int, out_features: int = 1, whiten: int = 0) -> None:
        super().__init__()
        if not 0 <= whiten <= hidden_size:
            raise ValueError(f"whiten={whiten!r}; expected 0 (off) up to the hidden size {hidden_size}")
        self.hidden_size, self.whiten = int(hidden_size), int(whiten)
        self.linear = nn.Linear(whiten or hidden_size, out_features)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        if whiten:
            self.register_buffer("white_mean", torch.zeros(hidden_size))
            self.register_buffer("white_basis", torch.zeros(hidden_size, whiten))  # zero until fitted
            self.register_buffer("white_fitted", torch.zeros((), dtype=torch.bool))

    def _normalised(self, hidden: torch.Tensor) -> torch.Tensor:
        size = hidden.shape[-1]
        return nn.functional.layer_norm(hidden.float(), (size,)) / math.sqrt(size)

    @property
    def fitted(self) -> bool:
        """Whether the whitening has been fitted (always true without whitening)."""
        return not self.whiten or bool(self.white_fitted)

    @torch.no_grad()
    def fit_whitening(self, hidden: torch.Tensor, floor: float = 1e-7) -> None:
        """Fit the whitening from ``hidden`` ``[N, H]`` (hidden states the head will read), once.

        Each of the top ``k`` principal directions of the normalised inputs is scaled by the inverse
        square root of its variance, and by ``1/sqrt(k)`` so the whitened input has unit norm on
        average. Directions whose variance is below ``floor`` times the largest one are left out
        (their components read as 0): the sample does not span them, and scaling them up would turn
        an unseen state into a huge input. Refitting would change what the trained weights mean, so
        a fitted head refuses; the weights are reset to zero here.
        """
        if not self.whiten:
            raise RLlamaError("this head has no whitening (whiten=0)")
        if self.fitted:
            raise RLlamaError("this head's whitening is already fitted; it is fitted once, before training")
        if hidden.ndim != 2 or hidden.shape[1] != self.hidden_size or len(hidden) < 2:
            raise RLlamaError(f"fit_whitening needs hidden states [N >= 2, {self.hidden_size}], "
                              f"got {tuple(hidden.shape)}")
        x = self._normalised(hidden).double()
        if not torch.isfinite(x).all():
            raise RLlamaError("fit_whitening got non-finite hidden states")
        mean, basis = pca_whitening(x, self.whiten, floor)
        self.white_mean.copy_(mean.float())
        self.white_basis.copy_(basis.float())
        self.white_fitted.fill_(True)
        self.linear.weight.zero_()
        self.linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, H] -> [B, out]
        x = self._normalised(hidden)
        if self.whiten:
            x = (x - self.white_mean) @ self.white_basis  # all zero until fitted: the output is the bias
        return self.linear(x)


POLICY_HEAD = "policy"
"""Name of the optional head whose output on a candidate's features is added to its logit (see
``OnPolicyConfig.policy_head``)."""
