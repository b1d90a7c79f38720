"""The SCRL policy network π(e) = W2·ReLU(W1·e) with a REINFORCE update (SCR²-ST §2.2)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .._base import ModelIO


class SamplingPolicy(ModelIO, nn.Module):
    """Scores spots from their image embeddings; samples k spots per round without replacement.

    ``π(e) = W2·ReLU(W1·e)`` (``n_hidden`` = 128 as in SCR²-ST); a softmax over the
    unsampled spots gives the selection probabilities. A round of ``k`` spots is drawn
    sequentially without replacement (Plackett–Luce, via the Gumbel top-k trick), and
    :meth:`log_prob` is the exact log-probability of that ordered draw, so the REINFORCE
    update (:meth:`reinforce`) follows the gradient of the log-probability of the sampled
    set — with a running-mean baseline and running reward normalisation (the reference code
    multiplied raw scores, with no baseline).

    Parameters
    ----------
    n_input
        Width of the image embedding.
    n_hidden
        Hidden units.
    lr
        Adam learning rate.
    baseline_momentum
        Momentum of the running mean/variance of rewards.
    seed
        Seed for weight initialisation and sampling.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> policy = si.models.SamplingPolicy(8, seed=0)
    >>> emb = np.random.default_rng(0).normal(size=(100, 8)).astype("float32")
    >>> picked = policy.sample(emb, np.ones(100, bool), k=5)
    >>> len(set(picked.tolist()))
    5
    >>> policy.save("policy.stimg")  # weights, optimiser and sampler state; no pickle  # doctest: +SKIP
    >>> policy = si.models.SamplingPolicy.load("policy.stimg")  # doctest: +SKIP
    """

    def __init__(self, n_input: int, n_hidden: int = 128, *, lr: float = 1e-3,
                 baseline_momentum: float = 0.9, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        self.net = nn.Sequential(nn.Linear(n_input, n_hidden), nn.ReLU(), nn.Linear(n_hidden, 1))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=gen) / np.sqrt(max(p.shape[-1], 1)))
        self.n_input, self.n_hidden, self.lr = int(n_input), int(n_hidden), float(lr)
        self.momentum = float(baseline_momentum)
        self.baseline, self.reward_var, self.n_updates = 0.0, 1.0, 0
        self._gen = gen
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        self.is_trained_ = True  # usable from initialisation (the first SCRL round is random anyway)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Scores ``π(e)``, shape ``(n,)``."""
        return self.net(emb).squeeze(-1)

    @staticmethod
    def _tensor(emb) -> torch.Tensor:
        return emb if isinstance(emb, torch.Tensor) else torch.as_tensor(np.asarray(emb, dtype=np.float32))

    @torch.no_grad()
    def scores(self, emb) -> np.ndarray:
        """Policy scores of every spot (in chunks of :attr:`chunk_size` spots: memory stays flat)."""
        return self._scores_no_grad(self._tensor(emb)).numpy()

    #: Spots per forward/backward chunk: above this, hidden activations are never held for all spots
    #: at once (1M spots × 128 hidden units would be 1 GB per activation).
    chunk_size: int = 1 << 16

    @torch.no_grad()
    def _scores_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self(x[i:i + self.chunk_size]) for i in range(0, max(len(x), 1), self.chunk_size)])

    @torch.no_grad()
    def probabilities(self, emb, available: np.ndarray) -> np.ndarray:
        """Softmax selection probabilities over ``available`` spots (0 elsewhere)."""
        s = self(self._tensor(emb))
        s = torch.where(torch.as_tensor(available), s, torch.tensor(-torch.inf))
        return torch.softmax(s, 0).numpy()

    @torch.no_grad()
    def sample(self, emb, available: np.ndarray, k: int, *, greedy: bool = False) -> np.ndarray:
        """Draw ``k`` available spots without replacement, in draw order (Gumbel top-k)."""
        s = self(self._tensor(emb))
        avail = torch.as_tensor(np.asarray(available, dtype=bool))
        k = int(min(k, int(avail.sum())))
        if not greedy:
            u = torch.rand(s.shape, generator=self._gen).clamp_(1e-12, 1 - 1e-12)
            s = s - torch.log(-torch.log(u))
        s = torch.where(avail, s, torch.tensor(-torch.inf))
        return torch.topk(s, k).indices.numpy()

    def log_prob(self, emb, available: np.ndarray, chosen: np.ndarray) -> torch.Tensor:
        r"""Log-probability of drawing ``chosen`` (in order) without replacement from ``available``.

        ``Σ_j [s_{c_j} − log Σ_{i ∈ U, i ∉ c_{<j}} exp s_i]`` (Plackett–Luce), vectorised:
        the remaining mass after each draw is the total minus a cumulative sum.
        """
        return self._log_prob(self(self._tensor(emb)), torch.as_tensor(np.asarray(available, dtype=bool)), chosen)

    @staticmethod
    def _normaliser(s: torch.Tensor, avail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_av = s[avail]
        m = s_av.max().detach()
        return m, torch.exp(s_av - m).sum()

    @classmethod
    def _log_prob(cls, s: torch.Tensor, avail: torch.Tensor, chosen: np.ndarray,
                  norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        m, z = cls._normaliser(s, avail) if norm is None else norm
        chosen_t = torch.as_tensor(np.asarray(chosen, dtype=np.int64))
        s_c = s[chosen_t]
        e_c = torch.exp(s_c - m)
        removed = torch.cumsum(e_c, 0) - e_c  # mass drawn before each pick
        remaining = (z - removed).clamp_min(1e-30)
        return (s_c - m - torch.log(remaining)).sum()

    def normalise(self, rewards: np.ndarray) -> np.ndarray:
        """Advantages: (reward − running mean) / running sd; then update the running stats."""
        r = np.asarray(rewards, dtype=np.float64)
        if self.n_updates == 0:
            self.baseline = float(r.mean())
            self.reward_var = float(r.var()) if r.size > 1 else 1.0
        adv = (r - self.baseline) / np.sqrt(self.reward_var + 1e-8)
        mu = self.momentum
        self.baseline = mu * self.baseline + (1 - mu) * float(r.mean())
        self.reward_var = mu * self.reward_var + (1 - mu) * float(((r - self.baseline) ** 2).mean())
        self.n_updates += 1
        return adv

    def reinforce(self, emb, available: np.ndarray, draws: list[np.ndarray], rewards: np.ndarray,
                  *, n_steps: int = 1, baseline: str = "running", scores: np.ndarray | None = None) -> float:
        """REINFORCE: ascend ``Σ_m A_m ∇ log π(S_m)``.

        Advantages ``A_m``: with ``baseline='running'``, from :meth:`normalise` (running mean and
        variance of rewards across updates); with ``baseline='rloo'``, leave-one-out — each draw's
        reward minus the mean reward of the *other* draws of the same update, divided by the
        rewards' sd (the draws share one state, so this baseline is unbiased and tracks rewards
        that shrink as the sample set grows).

        Parameters
        ----------
        emb
            ``(n, d)`` embeddings of all spots.
        available
            Spots that were available when ``draws`` were drawn.
        draws
            Index arrays, each one draw (in order).
        rewards
            One reward per draw.
        n_steps
            Gradient steps on this batch.
        baseline
            ``'running'`` or ``'rloo'``.
        scores
            :meth:`scores` of ``emb`` under the current weights, if the caller has them: with many
            spots the first step reuses them instead of a forward pass over every spot.

        Returns
        -------
        The last loss value.
        """
        if baseline == "rloo":
            r = np.asarray(rewards, dtype=np.float64)
            m = r.size
            adv_np = (r - r.mean()) * m / max(m - 1, 1) / (r.std() + 1e-8) if m > 1 else np.zeros_like(r)
        elif baseline == "running":
            adv_np = self.normalise(rewards)
        else:
            msg = f"baseline must be 'running' or 'rloo', got {baseline!r}."
            raise ValueError(msg)
        adv = torch.as_tensor(adv_np, dtype=torch.float32)
        x = self._tensor(emb)
        avail = torch.as_tensor(np.asarray(available, dtype=bool))
        loss = torch.tensor(0.0)
        chunked = len(x) > self.chunk_size
        for step in range(max(1, int(n_steps))):
            self.optimizer.zero_grad()
            # many spots: the loss is differentiated w.r.t. the scores first, then the network is
            # back-propagated chunk by chunk with those score gradients (the same gradient, without
            # holding every spot's hidden activations)
            if chunked:
                given = scores is not None and step == 0
                s = (torch.as_tensor(np.asarray(scores, dtype=np.float32)).clone() if given
                     else self._scores_no_grad(x)).requires_grad_(True)
            else:
                s = self(x)
            norm = self._normaliser(s, avail)  # shared by all draws
            lp = torch.stack([self._log_prob(s, avail, c, norm) / max(len(c), 1) for c in draws])
            loss = -(adv * lp).mean()
            if chunked:
                (g,) = torch.autograd.grad(loss, s)
                for i in range(0, len(x), self.chunk_size):
                    gi = g[i:i + self.chunk_size]
                    if bool(gi.any()):
                        self(x[i:i + self.chunk_size]).backward(gi)
            else:
                loss.backward()
            self.optimizer.step()
        return float(loss.detach())

    # ------------------------------------------------------------------ persistence
    def _get_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        tensors: dict[str, Any] = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors["generator_state"] = self._gen.get_state()
        opt = self.optimizer.state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"optim.{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
        header = {"n_input": self.n_input, "n_hidden": self.n_hidden, "lr": self.lr,
                  "baseline_momentum": self.momentum, "baseline": self.baseline, "reward_var": self.reward_var,
                  "n_updates": self.n_updates, "optim_param_groups": opt["param_groups"],
                  "optim_state_keys": {str(i): sorted(st) for i, st in opt["state"].items()}}
        return header, tensors

    @classmethod
    def _from_state(cls, header: dict[str, Any], tensors: dict[str, Any], adata: Any = None,
                    **kwargs: Any) -> SamplingPolicy:
        pol = cls(header["n_input"], header["n_hidden"], lr=header["lr"], baseline_momentum=header["baseline_momentum"])
        pol.net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
        pol._gen.set_state(tensors["generator_state"])
        state = {int(i): {k: tensors[f"optim.{i}.{k}"] for k in keys} for i, keys in header["optim_state_keys"].items()}
        pol.optimizer.load_state_dict({"state": state, "param_groups": header["optim_param_groups"]})
        pol.baseline, pol.reward_var, pol.n_updates = header["baseline"], header["reward_var"], header["n_updates"]
        return pol
