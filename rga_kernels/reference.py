"""The relation path written the obvious way: the oracle every backend is tested against.

It materializes the affinity R = thetaᵀ·phi (B, n, n) and the stacked relation vectors
r_i = [R(i, :), R(:, i)] (B, 2n, n) exactly as the public RGA implementation does, then
applies the 1x1 relation embedding. Short and slow on purpose.
"""
import torch


def relation_embed_reference(theta: torch.Tensor, phi: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """theta, phi: (B, d, n); weight: (M, 2n). Returns (B, M, n).

    out[b, m, i] = sum_j weight[m, j] * R[b, i, j] + sum_j weight[m, n + j] * R[b, j, i]
    with R[b] = theta[b]ᵀ · phi[b].
    """
    R = torch.bmm(theta.transpose(1, 2), phi)  # (B, n, n): R[b, i, j] = theta_i · phi_j
    # channel j at node i: first half R(i, j) (row i), second half R(j, i) (column i)
    stacked = torch.cat((R.transpose(1, 2), R), dim=1)  # (B, 2n, n)
    return torch.matmul(weight, stacked)  # (B, M, n)


def relation_embed_factorized(theta: torch.Tensor, phi: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same map through the identity Z = (A Φᵀ) Θ + (B Θᵀ) Φ with weight = [A | B].

    Never builds an n×n tensor. Plain PyTorch ops, so autograd, export and torch.compile see
    only matmuls of (M, n), (M, d) and (d, n) operands. Written so that torch.export keeps the
    batch size symbolic (no size-dependent branch of matmul on the batch).
    """
    n = theta.shape[-1]
    a, b = weight[:, :n], weight[:, n:]
    p = torch.matmul(phi, a.t()).transpose(1, 2)  # (B, M, d)
    q = torch.matmul(theta, b.t()).transpose(1, 2)  # (B, M, d)
    return torch.baddbmm(torch.bmm(q, phi), p, theta)


def relation_embed_backward_factorized(grad_out: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor,
                                       weight: torch.Tensor):
    """(dtheta, dphi, dweight) of relation_embed for the output gradient ``grad_out`` (B, M, n).

    The gradient formulas of csrc/relation.h in plain, differentiable PyTorch ops: the backends'
    backward uses them when a graph of the backward is asked for (``create_graph=True``), so
    double backward (gradient penalties, Hessian-vector products) is exact on every backend.
    """
    n = theta.shape[-1]
    a, b = weight[:, :n], weight[:, n:]
    p = torch.matmul(phi, a.t()).transpose(1, 2)  # (B, M, d)
    q = torch.matmul(theta, b.t()).transpose(1, 2)
    ut = torch.bmm(theta, grad_out.transpose(1, 2))  # (B, d, M)
    vt = torch.bmm(phi, grad_out.transpose(1, 2))
    dtheta = torch.baddbmm(torch.matmul(vt, b), p.transpose(1, 2), grad_out)
    dphi = torch.baddbmm(torch.matmul(ut, a), q.transpose(1, 2), grad_out)
    da = torch.tensordot(ut, phi, dims=([0, 1], [0, 1]))  # sum_b U_b phi_b, (M, n)
    db = torch.tensordot(vt, theta, dims=([0, 1], [0, 1]))
    return dtheta, dphi, torch.cat((da, db), 1)
