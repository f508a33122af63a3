"""The optimised training forward: the same loss as the plain dense step, at sparse cost.

Input: a `Crosscoder`, one batch of normalised activations, the step's k, the dead mask.
Output: `StepOutput`-ready pieces (training.py builds the loss from them). Contract: the loss
and every gradient equal those of the plain dense step (`training.training_forward` with
`sparse_decode=False`) up to float rounding; tests/test_sparse_step.py checks it.

Where the dense step spends its time and what replaces it:

* Encoder backward. Only the k·N kept pre-activations (plus the AuxK picks) reach the loss,
  so the pre-activation gradient is zero everywhere else. The pre-activations are computed
  once without autograd; `_PickedPreacts` hands the picked ones to autograd and its backward
  scatters their gradients into W_enc/b_enc (a sparse × dense product) instead of a dense
  [N, F]ᵀ × [N, D] matmul.
* Batch top-k over N·F scores. A candidate pre-filter keeps the scores above half the
  running inference threshold (the EMA of the smallest kept score), and the exact top-k runs
  over those few; when too few survive, or the k-th survivor is not clearly above the cut,
  it falls back to the full top-k, so the result is always exact.
* AuxK. The dense step builds two [N, F] tensors to rank the dead features; here only the
  dead columns are gathered and ranked.
* Decoder. Reads only the kept rows (`embedding_bag` with per-sample weights).

Two routes that differ in how they pick, never in what they compute:
`sync_free=False` (CPU) uses data-dependent sizes (the pre-filter, the dead-column gather,
the sparse product's coalescing), which cost a host synchronisation each on a GPU;
`sync_free=True` (CUDA) keeps every size fixed: full top-k, AuxK over all columns with live
ones masked out and a zero weight for live picks, the encoder gradient as a dense matmul of
the scattered [N, F] gradient. Both routes run and are compared on CPU in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xdiff_cli.dfc.crosscoder import Crosscoder, SparseActs

# The pre-filter cut as a fraction of the running threshold. The smallest kept score of a
# batch scatters around the threshold; at 0.8 about 2-4× k·N candidates survive (0.5 lets
# 21× through at F=8,192), and the fallback keeps the result exact when too few do.
PREFILTER_FRACTION = 0.8
# Decode through a dense [N, F] matmul instead of `embedding_bag` when a feature is kept
# for more than 1/32 of the tokens (dict_size ≤ 32·k, e.g. the tiny preset): there the
# matmul is cheaper than the gather/scatter and its sort. Device-independent on purpose.
DENSE_DECODE_MAX_RATIO = 32


def decodes_densely(dict_size: int, k: float) -> bool:
    return dict_size <= DENSE_DECODE_MAX_RATIO * k


@dataclass
class Picks:
    """Selected (token, feature) entries of the pre-activation matrix."""

    token_K: torch.Tensor
    feature_K: torch.Tensor


class _PickedPreacts(torch.autograd.Function):
    """ReLU pre-activations at picked (token, feature) entries, differentiable w.r.t. the
    encoder, given the pre-activations already computed without autograd.

    Backward: ∂L/∂W_enc[:, f] = Σ_{(n, f) picked} g · x_n (ReLU-masked) and ∂L/∂b_enc[f] = Σ g:
    a sparse × dense product, or (`dense_grad`: small dictionaries, the CUDA route) the picked
    gradients scattered into [N, F] and one matmul; never autograd through the dense encoder."""

    @staticmethod
    def forward(ctx, values_K, token_K, feature_K, x_NA, x_NB, W_enc_AF, W_enc_BF, b_enc_F, dense_grad):  # noqa: ANN001
        ctx.save_for_backward(values_K, token_K, feature_K, x_NA, x_NB)
        ctx.dict_size, ctx.dense_grad = b_enc_F.shape[0], dense_grad
        # Backward runs outside autocast: keep its matmul in the forward's autocast dtype.
        device = x_NA.device.type
        amp = device in ("cuda", "cpu") and torch.is_autocast_enabled(device)
        ctx.mm_dtype = torch.get_autocast_dtype(device) if amp else torch.float32
        ctx.dtypes = (W_enc_AF.dtype, W_enc_BF.dtype, b_enc_F.dtype)
        return values_K.clone()

    @staticmethod
    def backward(ctx, grad_K):  # noqa: ANN001
        values_K, token_K, feature_K, x_NA, x_NB = ctx.saved_tensors
        F_, N = ctx.dict_size, x_NA.shape[0]
        grad_K = torch.where(values_K > 0, grad_K, torch.zeros_like(grad_K)).float()  # ReLU
        if ctx.dense_grad:
            # Small dictionaries: a dense matmul beats the sparse product's sort. CUDA: the
            # sparse product coalesces (a data-dependent size, so a host sync); the dense one
            # does not, and in bf16 it costs one more encoder-sized matmul.
            G_NF = grad_K.new_zeros(N * F_).index_put_((token_K * F_ + feature_K,), grad_K, accumulate=True)
            G_NF = G_NF.view(N, F_).to(ctx.mm_dtype)
            product = lambda x_ND: (x_ND.to(ctx.mm_dtype).t() @ G_NF).float()  # noqa: E731
        else:  # sparse [F, N] gradient of the pre-activations (transposed), times x: [F, D]
            S_FN = torch.sparse_coo_tensor(
                torch.stack([feature_K, token_K]), grad_K, (F_, N), check_invariants=False
            )
            product = lambda x_ND: torch.sparse.mm(S_FN, x_ND.float()).t()  # noqa: E731
        grads = []
        for x_ND, dtype, needed in (
            (x_NA, ctx.dtypes[0], ctx.needs_input_grad[5]),
            (x_NB, ctx.dtypes[1], ctx.needs_input_grad[6]),
        ):
            grads.append(product(x_ND).to(dtype) if needed else None)
        grad_b = grad_K.new_zeros(F_).index_add_(0, feature_K, grad_K).to(ctx.dtypes[2])
        return None, None, None, None, None, grads[0], grads[1], grad_b, None


def encoder_preacts(
    model: Crosscoder, x_NA: torch.Tensor, x_NB: torch.Tensor, sync_free: bool
) -> torch.Tensor:
    """x_a W_enc_a + x_b W_enc_b + b_enc, without autograd and before the ReLU."""
    with torch.no_grad():
        pre_NF = torch.addmm(model.b_enc_F, x_NA, model.W_enc_AF)
        # Out of place under autocast (bf16, `--precision`): it does not apply to in-place ops.
        if sync_free or torch.is_autocast_enabled(x_NA.device.type):
            return torch.addmm(pre_NF, x_NB, model.W_enc_BF).float()
        return pre_NF.addmm_(x_NB, model.W_enc_BF)


def picked_values(
    model: Crosscoder, pre_NF: torch.Tensor, picks: Picks, x_NA, x_NB, dense_grad: bool = False
) -> torch.Tensor:  # noqa: ANN001
    """The ReLU'd pre-activations at `picks`, carrying the encoder's gradient."""
    F_ = pre_NF.shape[1]
    values_K = pre_NF.flatten()[picks.token_K * F_ + picks.feature_K].clamp_min(0)
    return _PickedPreacts.apply(
        values_K,
        picks.token_K,
        picks.feature_K,
        x_NA,
        x_NB,
        model.W_enc_AF,
        model.W_enc_BF,
        model.b_enc_F,
        dense_grad,
    )


@torch.no_grad()
def select_batch_topk(
    pre_NF: torch.Tensor, norm_F: torch.Tensor, n_keep: int, threshold: float | None, grouped: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact batch top-k of scores ReLU(pre) · norm over all N·F entries.

    Returns the kept flat indices (sorted, so grouped by token, when `grouped`) and their scores. With a
    positive `threshold` (CPU route) it first keeps the candidates scoring above
    PREFILTER_FRACTION × threshold; the candidate top-k is the full top-k whenever at least
    n_keep candidates survive and the n_keep-th is above the cut (every non-candidate scores
    at most the cut), otherwise it falls back to the full top-k."""
    if threshold is not None and threshold > 0:
        cut = PREFILTER_FRACTION * threshold
        # pre > cut / norm  ⇔  score > cut (norm > 0; a zero-norm feature scores 0 ≤ cut).
        flat_C = (pre_NF > cut / norm_F).flatten().nonzero().squeeze(1)
        if flat_C.numel() >= n_keep:
            F_ = pre_NF.shape[1]
            scores_C = pre_NF.flatten()[flat_C] * norm_F[flat_C % F_]
            top_K, pos_K = scores_C.topk(n_keep, sorted=False)
            # A margin for rounding between the comparison above and this product.
            if float(top_K.min()) > cut * (1 + 1e-5):
                if not grouped:
                    return flat_C[pos_K], top_K
                pos_K, order = pos_K.sort()
                return flat_C[pos_K], top_K[order]
    scores_NF = pre_NF.clamp_min(0) * norm_F
    top_K, flat_K = scores_NF.flatten().topk(n_keep, sorted=False)
    if not grouped:
        return flat_K, top_K
    flat_K, order = flat_K.sort()
    return flat_K, top_K[order]


@torch.no_grad()
def select_aux(
    pre_NF: torch.Tensor, norm_F: torch.Tensor, dead_F: torch.Tensor, k_aux: int, sync_free: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The top-`k_aux` dead features of each token by ReLU(pre) · norm (the joint AuxK picks).

    Returns feature ids [N, k] and a weight [N, k] (1 for a dead pick, 0 for a live filler),
    or None when nothing is dead (CPU route). The CPU route ranks only the dead columns; the
    sync-free route ranks all columns with live ones at -1 and k fixed, so when fewer than
    `k_aux` are dead the extra picks are live features with weight 0: same loss, same grads."""
    N, F_ = pre_NF.shape
    if not sync_free:
        dead_D = dead_F.nonzero().squeeze(1)
        if dead_D.numel() == 0:
            return None
        score_ND = pre_NF[:, dead_D].clamp_min_(0) * norm_F[dead_D]
        pos_NK = score_ND.topk(min(k_aux, dead_D.numel()), dim=-1, sorted=False).indices
        feature_NK = dead_D[pos_NK]
        return feature_NK, torch.ones_like(feature_NK, dtype=pre_NF.dtype)
    score_NF = torch.where(dead_F[None, :], pre_NF.clamp_min(0) * norm_F, torch.full_like(pre_NF, -1.0))
    feature_NK = score_NF.topk(min(k_aux, F_), dim=-1, sorted=False).indices
    return feature_NK, dead_F[feature_NK].to(pre_NF.dtype)


@dataclass
class SparseForward:
    xhat_NA: torch.Tensor
    xhat_NB: torch.Tensor
    aux_sq_err: torch.Tensor | None  # Σ‖resid − AuxK approx‖² over both models (None: nothing dead)
    n_active: torch.Tensor
    fired_F: torch.Tensor
    min_kept: torch.Tensor
    any_dead: torch.Tensor | None  # sync-free route: whether anything is dead (gates the AuxK term)
    dense_decode: bool = False
    aux_feature_NK: torch.Tensor | None = None
    aux_value_NK: torch.Tensor | None = None


def sparse_forward(
    model: Crosscoder,
    x_NA: torch.Tensor,
    x_NB: torch.Tensor,
    k: float,
    dead_F: torch.Tensor,
    k_aux: int,
    sync_free: bool,
) -> SparseForward:
    """Encoder, batch top-k, sparse decode and the AuxK picks of one training step.

    The AuxK reconstruction itself needs the main residual, so it is left to the caller
    (`aux_approx`); its picked activations are already wired into the encoder gradient."""
    N, F_ = x_NA.shape[0], model.cfg.dict_size
    pre_NF = encoder_preacts(model, x_NA, x_NB, sync_free)
    norm_a_F, norm_b_F = model.decoder_norms()
    norm_F = (norm_a_F + norm_b_F).detach().float()
    n_keep = max(1, min(int(round(k * N)), N * F_))
    threshold = None if sync_free else float(model.threshold)
    dense = decodes_densely(F_, k)
    # Under torchrun (`distributed.global_batch_topk`) the cut is the global batch's.
    select = getattr(model, "global_topk_select", None)
    if select is not None:
        flat_K, score_K = select(pre_NF, norm_F, k, not dense)
    else:
        flat_K, score_K = select_batch_topk(pre_NF, norm_F, n_keep, threshold, grouped=not dense)
    token_K, feature_K = flat_K // F_, flat_K % F_
    aux = select_aux(pre_NF, norm_F, dead_F, k_aux, sync_free) if k_aux > 0 else None
    # One autograd node for every picked entry: the kept ones and the AuxK ones.
    if aux is not None:
        aux_feature_NK, aux_weight_NK = aux
        k_a = aux_feature_NK.shape[1]
        aux_token = torch.arange(N, device=x_NA.device).repeat_interleave(k_a)
        picks = Picks(torch.cat([token_K, aux_token]), torch.cat([feature_K, aux_feature_NK.flatten()]))
    else:
        picks = Picks(token_K, feature_K)
    values = picked_values(model, pre_NF, picks, x_NA, x_NB, dense_grad=dense or sync_free)
    value_K = values[: flat_K.numel()]
    if dense:
        f_NF = value_K.new_zeros(N * F_).index_put((flat_K,), value_K).view(N, F_)
        xhat_NA, xhat_NB = model.decode(f_NF)
    else:
        offsets_N = torch.searchsorted(token_K, torch.arange(N, device=x_NA.device))
        xhat_NA, xhat_NB = model.decode_sparse(SparseActs(feature_K, value_K, offsets_N, N, F_))
    positive_K = score_K > 0
    inf = torch.full_like(score_K, float("inf"))
    min_kept = torch.where(positive_K, score_K, inf).min()
    min_kept = torch.where(torch.isinf(min_kept), torch.zeros_like(min_kept), min_kept)
    if select is not None:
        min_kept = model.global_min_kept(min_kept)
    fired_F = torch.zeros(F_, device=x_NA.device).index_add_(0, feature_K, (value_K.detach() > 0).float()) > 0
    out = SparseForward(
        xhat_NA,
        xhat_NB,
        None,
        (value_K.detach() > 0).sum(),
        fired_F,
        min_kept,
        any_dead=dead_F.any() if sync_free else None,
        dense_decode=dense,
    )
    if aux is not None:
        out.aux_feature_NK = aux_feature_NK
        out.aux_value_NK = values[flat_K.numel() :].view(N, -1) * aux_weight_NK
    return out


def residual_variance(model: Crosscoder, resid_ND: torch.Tensor) -> torch.Tensor:
    """Σ (r − mean)² over the batch; under torchrun the global batch's, divided by the world
    size (`distributed.global_residual_variance`), so the ranks' AuxK terms average to the
    single-process one. The joint AuxK of both routes divides by it."""
    variance = getattr(model, "global_residual_variance", None)
    if variance is not None:
        return variance(resid_ND)
    return (resid_ND - resid_ND.mean(0)).pow(2).sum()


def aux_joint_from_picks(
    model: Crosscoder, fwd: SparseForward, resid_NA: torch.Tensor, resid_NB: torch.Tensor
) -> torch.Tensor:
    """The joint AuxK term (as `training.aux_k_joint`) from the picks `sparse_forward` made."""
    if fwd.aux_feature_NK is None:
        return resid_NA.new_zeros(())
    sq_err, total_var = resid_NA.new_zeros(()), resid_NA.new_zeros(())
    for W_FD, resid_ND in ((model.W_dec_FA, resid_NA), (model.W_dec_FB, resid_NB)):
        resid_ND = resid_ND.detach().float()
        if fwd.dense_decode:
            f_NF = fwd.aux_value_NK.new_zeros(resid_ND.shape[0], W_FD.shape[0])
            approx_ND = f_NF.scatter(1, fwd.aux_feature_NK, fwd.aux_value_NK.to(f_NF.dtype)) @ W_FD
        else:
            approx_ND = F.embedding_bag(
                fwd.aux_feature_NK, W_FD, mode="sum", per_sample_weights=fwd.aux_value_NK.to(W_FD.dtype)
            )
        sq_err = sq_err + (resid_ND - approx_ND.float()).pow(2).sum()
        total_var = total_var + residual_variance(model, resid_ND)
    aux = sq_err / total_var.clamp_min(1e-12)
    if fwd.any_dead is not None:  # sync-free route: no dead feature means no AuxK term
        aux = torch.where(fwd.any_dead, aux, torch.zeros_like(aux))
    return aux
