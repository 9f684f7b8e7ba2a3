"""The fused branch's Triton kernels (the @triton.jit bodies; the launches, argument packing and
the TritonKernels interface are in _triton_branch.py, whose docstring describes the layout of the
work and the precision rules)."""
from __future__ import annotations

from ._triton import TRITON_AVAILABLE, tl, triton

BLOCK = 1024  # nodes per loop step of a per-channel program
TILE = 4096  # elements of a (channels x nodes) tile
#: gate_fwd in training splits its work over a grid (two launches: the logits with partial statistics
#: per block, then the merge and the sigmoid) from this many multiply-adds per pass (B*n*H) up; below
#: it one program (one launch) does all. csrc/branch_ops.h's kGateSplitWork is the same number.
GATE_SPLIT_WORK = 1 << 18

if TRITON_AVAILABLE:
    @triton.jit
    def _node_offsets(i, n, sb, sn):
        """Element offsets of flat node indices i = b*n + j (int64)."""
        b = i // n
        return b.to(tl.int64) * sb + (i - b * n).to(tl.int64) * sn

    @triton.jit
    def _pair(hi, lo, ACC: tl.constexpr):
        """A host float passed as two float32 halves (see _f32_pair), in the accumulation dtype."""
        return tl.cast(hi, ACC) + tl.cast(lo, ACC)

    @triton.jit
    def _bn(x, mean, invstd, w, b):
        """The BatchNorm affine map, in branch_reference's order of operations."""
        return ((x - mean) * invstd) * w + b

    @triton.jit
    def _stats(y, sb, sc, sn, ch, cm, n, N, rm, rv, mean_out, invstd_out, eps, mom,
               BATCH_STATS: tl.constexpr, HAS_RUNNING: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr):
        """(mean, invstd) of channels ch (a [BC] vector, mask cm) of y over its N = B*n nodes, in
        eps's dtype: batch statistics by two passes, or the running ones. Stores them at
        mean_out/invstd_out[ch]; with HAS_RUNNING updates rm/rv[ch] (unbiased variance)."""
        ACC = eps.dtype
        if BATCH_STATS:
            nn = tl.arange(0, BN)
            base = y + ch[:, None].to(tl.int64) * sc
            s = tl.zeros([BC, BN], ACC)
            for i0 in range(0, N, BN):
                i = i0 + nn
                m = cm[:, None] & (i < N)[None, :]
                s += tl.load(base + _node_offsets(i, n, sb, sn)[None, :], mask=m, other=0.0).to(ACC)
            mean = tl.sum(s, 1) / N
            s = tl.zeros([BC, BN], ACC)
            for i0 in range(0, N, BN):
                i = i0 + nn
                m = cm[:, None] & (i < N)[None, :]
                x = tl.load(base + _node_offsets(i, n, sb, sn)[None, :], mask=m, other=0.0).to(ACC)
                d = tl.where(m, x - mean[:, None], 0.0)
                s += d * d
            var = tl.sum(s, 1) / N
            if HAS_RUNNING:
                count = tl.zeros([BC], ACC) + N
                unbiased = var * (count / tl.maximum(count - 1, 1))
                r_m = tl.load(rm + ch, mask=cm, other=0.0).to(ACC)
                r_v = tl.load(rv + ch, mask=cm, other=0.0).to(ACC)
                tl.store(rm + ch, (r_m * (1 - mom) + mom * mean).to(rm.dtype.element_ty), mask=cm)
                tl.store(rv + ch, (r_v * (1 - mom) + mom * unbiased).to(rv.dtype.element_ty), mask=cm)
        else:
            mean = tl.load(rm + ch, mask=cm, other=0.0).to(ACC)
            var = tl.load(rv + ch, mask=cm, other=1.0).to(ACC)
        invstd = 1.0 / tl.sqrt(var + eps)
        tl.store(mean_out + ch, mean, mask=cm)
        tl.store(invstd_out + ch, invstd, mask=cm)
        return mean, invstd

    # ------------------------------------------------------------------------------------------
    # BatchNorm + ReLU of (B, K, n) per channel, and its backward
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _mean_group_program(y, y_sb, y_sc, y_sn, w, bias, rm, rv, mean_out, invstd_out, chmean, m_start, m_k, n, N,
                            eps, mom, BATCH_STATS: tl.constexpr, HAS_RUNNING: tl.constexpr, MC: tl.constexpr,
                            MN: tl.constexpr):
        """bn_act_fwd's mean group [m_start, m_start + m_k): its statistics (chunks of MC channels),
        then chmean (B, 1, n) = the mean over its channels of ReLU(BN(y)), per block of MN nodes."""
        ACC = eps.dtype
        cc = tl.arange(0, MC)
        for c0 in range(0, m_k, MC):
            _stats(y, y_sb, y_sc, y_sn, m_start + c0 + cc, (c0 + cc) < m_k, n, N, rm, rv, mean_out, invstd_out,
                   eps, mom, BATCH_STATS, HAS_RUNNING, MC, MN)
        tl.debug_barrier()  # the statistics just stored are read back below
        nn = tl.arange(0, MN)
        for i0 in range(0, N, MN):
            i = i0 + nn
            total = tl.zeros([MN], ACC)
            for c0 in range(0, m_k, MC):
                ch = m_start + c0 + cc
                cm = (c0 + cc) < m_k
                mean = tl.load(mean_out + ch, mask=cm, other=0.0)
                invstd = tl.load(invstd_out + ch, mask=cm, other=0.0)
                wc = tl.load(w + ch, mask=cm, other=0.0).to(ACC)
                bc = tl.load(bias + ch, mask=cm, other=0.0).to(ACC)
                m = cm[:, None] & (i < N)[None, :]
                x = tl.load(y + ch[:, None].to(tl.int64) * y_sc + _node_offsets(i, n, y_sb, y_sn)[None, :],
                            mask=m, other=0.0).to(ACC)
                act = tl.maximum(_bn(x, mean[:, None], invstd[:, None], wc[:, None], bc[:, None]), 0.0)
                total += tl.sum(tl.where(m, act, 0.0), 0)
            tl.store(chmean + i, (total / m_k).to(chmean.dtype.element_ty), mask=i < N)

    @triton.jit
    def _bn_act_fwd_kernel(
        y, y_sb, y_sc, y_sn, w, bias, rm, rv, mean_out, invstd_out,
        o0, o1, o2, ok0, ok1, ok2,  # the written groups' outputs (B, ok_i, n), contiguous
        s1, s2,  # groups: [0, s1), [s1, s2), [s2, K)
        prefix, p_sb, p_sc, p_sn, P,  # prefix (B, P, n) -> o0[:, :P]
        chmean, m_start, m_k,  # the mean group [m_start, m_start + m_k) -> chmean (B, 1, n)
        n, N, eps_hi, eps_lo, mom_hi, mom_lo,
        BATCH_STATS: tl.constexpr, HAS_RUNNING: tl.constexpr, HAS_MEAN: tl.constexpr, ACC: tl.constexpr,
        BLOCK: tl.constexpr, MC: tl.constexpr, MN: tl.constexpr,
    ):
        """Programs 0 .. K - m_k - 1: one written channel each (stats, running update, ReLU(BN(y))
        into its group's output; also the prefix copy). With HAS_MEAN, the last program: the mean
        group's stats (chunks of MC channels), then chmean = mean over its channels of ReLU(BN(y))."""
        eps = _pair(eps_hi, eps_lo, ACC)
        mom = _pair(mom_hi, mom_lo, ACC)
        pid = tl.program_id(0)
        n_written = tl.num_programs(0) - HAS_MEAN
        if pid < n_written:
            c = pid + tl.where(pid >= m_start, m_k, 0)  # skip the mean group's channels
            ch = c + tl.zeros([1], tl.int32)
            cm = ch >= 0
            mean, invstd = _stats(y, y_sb, y_sc, y_sn, ch, cm, n, N, rm, rv, mean_out, invstd_out, eps, mom,
                                  BATCH_STATS, HAS_RUNNING, 1, BLOCK)
            wc = tl.load(w + ch).to(ACC)
            bc = tl.load(bias + ch).to(ACC)
            grp = (c >= s1).to(tl.int32) + (c >= s2).to(tl.int32)
            if grp == 0:
                out = o0
            elif grp == 1:
                out = o1
            else:
                out = o2
            ok = tl.where(grp == 0, ok0, tl.where(grp == 1, ok1, ok2))
            och = c - tl.where(grp == 0, 0, tl.where(grp == 1, s1, s2)) + tl.where(grp == 0, P, 0)
            nn = tl.arange(0, BLOCK)
            for i0 in range(0, N, BLOCK):
                i = i0 + nn
                m = (i < N)[None, :]
                x = tl.load(y + ch[:, None].to(tl.int64) * y_sc + _node_offsets(i, n, y_sb, y_sn)[None, :],
                            mask=m, other=0.0).to(ACC)
                act = tl.maximum(_bn(x, mean[:, None], invstd[:, None], wc[:, None], bc[:, None]), 0.0)
                dst = out + och.to(tl.int64) * n + _node_offsets(i, n, ok * n, 1)[None, :]
                tl.store(dst, act.to(out.dtype.element_ty), mask=m)
            for p in range(pid, P, n_written):  # the prefix channels, spread over the programs
                for i0 in range(0, N, BLOCK):
                    i = i0 + nn
                    p64 = tl.cast(p, tl.int64)
                    v = tl.load(prefix + p64 * p_sc + _node_offsets(i, n, p_sb, p_sn), mask=i < N)
                    tl.store(o0 + p64 * n + _node_offsets(i, n, ok0 * n, 1), v.to(o0.dtype.element_ty), mask=i < N)
        elif HAS_MEAN:
            _mean_group_program(y, y_sb, y_sc, y_sn, w, bias, rm, rv, mean_out, invstd_out, chmean, m_start, m_k,
                                n, N, eps, mom, BATCH_STATS, HAS_RUNNING, MC, MN)

    @triton.jit
    def _bn_bwd_block(y, y_sb, y_sn, g, g_sb, g_sn, g_div, g_on, i, n, N, mean, invstd, w, b):
        """At nodes i of one channel: the masked incoming gradient (g / g_div where the ReLU passed, 0
        without a gradient or outside the nodes) and x̂."""
        m = i < N
        xhat = (tl.load(y + _node_offsets(i, n, y_sb, y_sn), mask=m, other=0.0).to(mean.dtype) - mean) * invstd
        gi = tl.load(g + _node_offsets(i, n, g_sb, g_sn), mask=m & g_on, other=0.0)
        return tl.where(xhat * w + b > 0, gi.to(mean.dtype) / g_div, 0.0), xhat

    @triton.jit
    def _bn_act_bwd_kernel(
        y, y_sb, y_sc, y_sn, w, bias, mean, invstd, grad_y, gy_sb, gy_sc, gy_sn, grad_w, grad_b,
        g0, g0_sb, g0_sc, g0_sn, g0_div, g0_on,  # the incoming gradient of each group: tensor, strides,
        g1, g1_sb, g1_sc, g1_sn, g1_div, g1_on,  # divisor (the mean group's k) and whether it has one
        g2, g2_sb, g2_sc, g2_sn, g2_div, g2_on,
        s1, s2, n, N,
        BATCH_STATS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per channel c: g = its group's incoming gradient (/ k for the mean group) where
        the ReLU passed; grad_bias = sum g, grad_weight = sum g*x̂, then grad_y (y's layout)."""
        c = tl.program_id(0)
        grp = (c >= s1).to(tl.int32) + (c >= s2).to(tl.int32)
        if grp == 0:
            g = g0
        elif grp == 1:
            g = g1
        else:
            g = g2
        g_sb = tl.where(grp == 0, g0_sb, tl.where(grp == 1, g1_sb, g2_sb))
        g_sc = tl.where(grp == 0, g0_sc, tl.where(grp == 1, g1_sc, g2_sc))
        g_sn = tl.where(grp == 0, g0_sn, tl.where(grp == 1, g1_sn, g2_sn))
        g_div = tl.where(grp == 0, g0_div, tl.where(grp == 1, g1_div, g2_div))
        g_on = tl.where(grp == 0, g0_on, tl.where(grp == 1, g1_on, g2_on)) != 0
        local = c - tl.where(grp == 0, 0, tl.where(grp == 1, s1, s2))
        mc = tl.load(mean + c)
        ic = tl.load(invstd + c)
        wc = tl.load(w + c).to(ACC)
        bc = tl.load(bias + c).to(ACC)
        nn = tl.arange(0, BLOCK)
        sum_g = tl.zeros([BLOCK], ACC)
        sum_gx = tl.zeros([BLOCK], ACC)
        for i0 in range(0, N, BLOCK):  # the sums over the nodes
            gi, xhat = _bn_bwd_block(y + c.to(tl.int64) * y_sc, y_sb, y_sn, g + local.to(tl.int64) * g_sc, g_sb, g_sn,
                                     g_div, g_on, i0 + nn, n, N, mc, ic, wc, bc)
            sum_g += gi
            sum_gx += gi * xhat
        gb = tl.sum(sum_g, 0)
        gw = tl.sum(sum_gx, 0)
        tl.store(grad_b + c, gb.to(grad_b.dtype.element_ty))
        tl.store(grad_w + c, gw.to(grad_w.dtype.element_ty))
        for i0 in range(0, N, BLOCK):  # grad_y
            i = i0 + nn
            gi, xhat = _bn_bwd_block(y + c.to(tl.int64) * y_sc, y_sb, y_sn, g + local.to(tl.int64) * g_sc, g_sb, g_sn,
                                     g_div, g_on, i, n, N, mc, ic, wc, bc)
            if BATCH_STATS:
                gy = (wc * ic) * (gi - gb / N - xhat * gw / N)
            else:
                gy = (wc * ic) * gi
            tl.store(grad_y + c.to(tl.int64) * gy_sc + _node_offsets(i, n, gy_sb, gy_sn),
                     gy.to(grad_y.dtype.element_ty), mask=i < N)

    @triton.jit
    def _bn_stats_kernel(y, y_sb, y_sc, y_sn, rm, rv, mean_out, invstd_out, n, N, eps_hi, eps_lo, mom_hi, mom_lo,
                         BATCH_STATS: tl.constexpr, HAS_RUNNING: tl.constexpr, ACC: tl.constexpr,
                         BLOCK: tl.constexpr):
        """One program per channel: the statistics alone (and the running update)."""
        ch = tl.program_id(0) + tl.zeros([1], tl.int32)
        _stats(y, y_sb, y_sc, y_sn, ch, ch >= 0, n, N, rm, rv, mean_out, invstd_out,
               _pair(eps_hi, eps_lo, ACC), _pair(mom_hi, mom_lo, ACC), BATCH_STATS, HAS_RUNNING, 1, BLOCK)

    # ------------------------------------------------------------------------------------------
    # The attention head a = sigmoid(BN_l(w2 · ReLU(BN_h(h)))), and its backward
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _head_logits(h, h_sb, h_sc, h_sn, hw, hb, hm, hi, w2, w2_s, i, H, n, N, ACC: tl.constexpr,
                     HC: tl.constexpr):
        """The logits l = w2 · ReLU(BN_h(h)) at nodes i (a [BN] vector; 0 outside N), summing
        (HC channels x BN nodes) tiles over the channels, in ACC."""
        cc = tl.arange(0, HC)
        l = tl.zeros(i.shape, ACC)
        for c0 in range(0, H, HC):
            ch = c0 + cc
            cm = ch < H
            m = cm[:, None] & (i < N)[None, :]
            x = tl.load(h + ch[:, None].to(tl.int64) * h_sc + _node_offsets(i, n, h_sb, h_sn)[None, :],
                        mask=m, other=0.0).to(ACC)
            pre = _bn(x, tl.load(hm + ch, mask=cm, other=0.0)[:, None],
                      tl.load(hi + ch, mask=cm, other=0.0)[:, None],
                      tl.load(hw + ch, mask=cm, other=0.0).to(ACC)[:, None],
                      tl.load(hb + ch, mask=cm, other=0.0).to(ACC)[:, None])
            w2c = tl.load(w2 + ch * w2_s, mask=cm, other=0.0).to(ACC)
            l += tl.sum(tl.where(m, w2c[:, None] * tl.maximum(pre, 0.0), 0.0), 0)
        return l

    @triton.jit
    def _sigmoid_bn(l, mean, invstd, lw, lb):
        """a = sigmoid(BN_l(l)) for a [1, BN] row of logits and [1] statistics."""
        s = _bn(l, mean[:, None], invstd[:, None], lw[:, None], lb[:, None])
        return 1.0 / (1.0 + tl.exp(-s))

    @triton.jit
    def _gate_fwd_kernel(
        h, h_sb, h_sc, h_sn, hw, hb, hm, hi, w2, w2_s, lw, lb, rm, rv, l_out, l_acc, l_mean, l_invstd, a_out,
        H, n, N, eps_hi, eps_lo, mom_hi, mom_lo,
        BATCH_STATS: tl.constexpr, HAS_RUNNING: tl.constexpr, ACC: tl.constexpr, L_ACC: tl.constexpr,
        HC: tl.constexpr, BN: tl.constexpr,
    ):
        """A single program (training at small sizes, see gate_fwd). Pass 1: the logits l (B, 1, n)
        per node block, stored in h's dtype (l_out) and, when that is narrower, in the accumulation
        dtype (l_acc, L_ACC). Then l's statistics (or the running ones) and pass 2:
        a = sigmoid(BN_l(l))."""
        eps = _pair(eps_hi, eps_lo, ACC)
        mom = _pair(mom_hi, mom_lo, ACC)
        nn = tl.arange(0, BN)
        for i0 in range(0, N, BN):
            i = i0 + nn
            l = _head_logits(h, h_sb, h_sc, h_sn, hw, hb, hm, hi, w2, w2_s, i, H, n, N, ACC, HC)
            tl.store(l_out + i, l.to(l_out.dtype.element_ty), mask=i < N)
            if L_ACC:
                tl.store(l_acc + i, l, mask=i < N)
        tl.debug_barrier()  # the logits just stored are read back
        zero = tl.zeros([1], tl.int32)
        mean, invstd = _stats(l_acc, n, 0, 1, zero, zero == 0, n, N, rm, rv, l_mean, l_invstd, eps, mom,
                              BATCH_STATS, HAS_RUNNING, 1, BN)
        wl = tl.load(lw + zero).to(ACC)
        bl = tl.load(lb + zero).to(ACC)
        for i0 in range(0, N, BN):
            i = (i0 + nn)[None, :]
            a = _sigmoid_bn(tl.load(l_acc + i, mask=i < N, other=0.0).to(ACC), mean, invstd, wl, bl)
            tl.store(a_out + i, a.to(a_out.dtype.element_ty), mask=i < N)

    @triton.jit
    def _gate_logits_kernel(
        h, h_sb, h_sc, h_sn, hw, hb, hm, hi, w2, w2_s, lw, lb, rm, rv, l_out, l_acc, part, P, l_mean, l_invstd,
        a_out, H, n, N, eps_hi, eps_lo,
        BATCH_STATS: tl.constexpr, ACC: tl.constexpr, L_ACC: tl.constexpr, HC: tl.constexpr, BN: tl.constexpr,
    ):
        """A program per block of BN nodes: its logits (as _gate_fwd_kernel's pass 1). Training: the
        block's mean and sum of squared deviations at part[pid] and part[P + pid], merged by
        _gate_norm_kernel. Evaluation: a = sigmoid(BN_l(l)) with the running statistics, here."""
        pid = tl.program_id(0)
        i = pid * BN + tl.arange(0, BN)
        im = i < N
        l = _head_logits(h, h_sb, h_sc, h_sn, hw, hb, hm, hi, w2, w2_s, i, H, n, N, ACC, HC)
        tl.store(l_out + i, l.to(l_out.dtype.element_ty), mask=im)
        if BATCH_STATS:
            if L_ACC:
                tl.store(l_acc + i, l, mask=im)
            count = tl.minimum(N - pid * BN, BN).to(ACC)
            mean = tl.sum(l, 0) / count
            d = tl.where(im, l - mean, 0.0)
            tl.store(part + pid, mean)
            tl.store(part + P + pid, tl.sum(d * d, 0))
        else:
            zero = tl.zeros([1], tl.int32)
            mean = tl.load(rm + zero).to(ACC)
            invstd = 1.0 / tl.sqrt(tl.load(rv + zero).to(ACC) + _pair(eps_hi, eps_lo, ACC))
            first = zero == pid
            tl.store(l_mean + zero, mean, mask=first)
            tl.store(l_invstd + zero, invstd, mask=first)
            a = _sigmoid_bn(l[None, :], mean, invstd, tl.load(lw + zero).to(ACC), tl.load(lb + zero).to(ACC))
            tl.store(a_out + i[None, :], a.to(a_out.dtype.element_ty), mask=im[None, :])

    @triton.jit
    def _gate_norm_kernel(
        part, P, PB, l_acc, lw, lb, rm, rv, l_mean, l_invstd, a_out, N, eps_hi, eps_lo, mom_hi, mom_lo,
        HAS_RUNNING: tl.constexpr, ACC: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    ):
        """A program per block of BN nodes: the logits' batch statistics from _gate_logits_kernel's P
        partial ones (PB nodes each; Chan's merge: mean = sum(c_p m_p) / N and
        M2 = sum(M2_p + c_p (m_p - mean)^2), the same order in every program), then
        a = sigmoid(BN_l(l)) on its block. Program 0 stores the statistics and updates the running
        ones (unbiased variance)."""
        eps = _pair(eps_hi, eps_lo, ACC)
        mom = _pair(mom_hi, mom_lo, ACC)
        pp = tl.arange(0, BP)
        s = tl.zeros([BP], ACC)
        for p0 in range(0, P, BP):
            p = p0 + pp
            c = tl.minimum(N - p * PB, PB).to(ACC)
            s += tl.where(p < P, c * tl.load(part + p, mask=p < P, other=0.0), 0.0)
        mean = tl.sum(s, 0) / N
        s = tl.zeros([BP], ACC)
        for p0 in range(0, P, BP):
            p = p0 + pp
            c = tl.minimum(N - p * PB, PB).to(ACC)
            d = tl.load(part + p, mask=p < P, other=0.0) - mean
            s += tl.where(p < P, tl.load(part + P + p, mask=p < P, other=0.0) + c * d * d, 0.0)
        var = tl.sum(s, 0) / N
        zero = tl.zeros([1], tl.int32)
        mean = mean + tl.zeros([1], ACC)
        var = var + tl.zeros([1], ACC)
        invstd = 1.0 / tl.sqrt(var + eps)
        first = zero == tl.program_id(0)
        tl.store(l_mean + zero, mean, mask=first)
        tl.store(l_invstd + zero, invstd, mask=first)
        if HAS_RUNNING:
            count = tl.zeros([1], ACC) + N
            unbiased = var * (count / tl.maximum(count - 1, 1))
            r_m = tl.load(rm + zero).to(ACC)
            r_v = tl.load(rv + zero).to(ACC)
            tl.store(rm + zero, (r_m * (1 - mom) + mom * mean).to(rm.dtype.element_ty), mask=first)
            tl.store(rv + zero, (r_v * (1 - mom) + mom * unbiased).to(rv.dtype.element_ty), mask=first)
        i = (tl.program_id(0) * BN + tl.arange(0, BN))[None, :]
        a = _sigmoid_bn(tl.load(l_acc + i, mask=i < N, other=0.0).to(ACC), mean, invstd, tl.load(lw + zero).to(ACC),
                        tl.load(lb + zero).to(ACC))
        tl.store(a_out + i, a.to(a_out.dtype.element_ty), mask=i < N)

    @triton.jit
    def _gate_bwd_kernel(
        go, go_sb, go_sc, go_sn, t, t_sb, t_sc, t_sn, a, a_sb, a_sn, gt, gt_sb, gt_sc, gt_sn, gs,
        C, n, N, ACC: tl.constexpr, CC: tl.constexpr, BN: tl.constexpr,
    ):
        """A program per block of BN nodes: grad_target = grad_out * a and
        grad_s = sum_c(grad_out * target) * a * (1 - a), over chunks of CC channels."""
        i = tl.program_id(0) * BN + tl.arange(0, BN)
        im = i < N
        av = tl.load(a + _node_offsets(i, n, a_sb, a_sn), mask=im, other=0.0).to(ACC)
        cc = tl.arange(0, CC)
        da = tl.zeros([BN], ACC)
        for c0 in range(0, C, CC):
            ch = (c0 + cc)[:, None].to(tl.int64)
            m = ((c0 + cc) < C)[:, None] & im[None, :]
            g = tl.load(go + ch * go_sc + _node_offsets(i, n, go_sb, go_sn)[None, :], mask=m, other=0.0).to(ACC)
            x = tl.load(t + ch * t_sc + _node_offsets(i, n, t_sb, t_sn)[None, :], mask=m, other=0.0).to(ACC)
            tl.store(gt + ch * gt_sc + _node_offsets(i, n, gt_sb, gt_sn)[None, :],
                     (g * av[None, :]).to(gt.dtype.element_ty), mask=m)
            da += tl.sum(g * x, 0)
        tl.store(gs + i, (da * av * (1 - av)).to(gs.dtype.element_ty), mask=im)

    @triton.jit
    def _head_bwd_block(gs, gs_sb, gs_sn, l, l_sb, l_sn, h, h_sb, h_sc, h_sn, i, k, n, N, lmean, linv, lscale,
                        glb, glw, mk, ik, wk, bk, w2k, BATCH_STATS: tl.constexpr):
        """At nodes i, for hidden channel k: dl (the logit's gradient through BN_l), x̂ and pre of
        BN_h, and g = w2[k] * dl * [pre > 0] (0 outside the nodes)."""
        m = i < N
        g = tl.load(gs + _node_offsets(i, n, gs_sb, gs_sn), mask=m, other=0.0).to(lmean.dtype)
        lhat = (tl.load(l + _node_offsets(i, n, l_sb, l_sn), mask=m, other=0.0).to(lmean.dtype) - lmean) * linv
        if BATCH_STATS:
            dl = lscale * (g - glb / N - lhat * glw / N)
        else:
            dl = lscale * g
        xhat = (tl.load(h + k.to(tl.int64) * h_sc + _node_offsets(i, n, h_sb, h_sn), mask=m,
                        other=0.0).to(lmean.dtype) - mk) * ik
        pre = xhat * wk + bk
        return dl, xhat, pre, tl.where(m & (pre > 0), w2k * dl, 0.0)

    @triton.jit
    def _head_bwd_kernel(
        gs, gs_sb, gs_sn, l, l_sb, l_sn, lw, lm, li, h, h_sb, h_sc, h_sn, hw, hb, hm, hi, w2, w2_s,
        grad_h, gh_sb, gh_sc, gh_sn, grad_w2, grad_hw, grad_hb, grad_lw, grad_lb, n, N,
        BATCH_STATS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per hidden channel k. The logit BN's backward sums (sum grad_s, sum grad_s*l̂;
        every program computes them, program 0 stores them as grad_l_bias/weight) give dl; then
        grad_w2[k] = sum dl*ReLU(pre), g = w2[k]*dl*[pre > 0], BN_h's backward sums and grad_h[:, k]."""
        k = tl.program_id(0)
        nn = tl.arange(0, BLOCK)
        lmean = tl.load(lm)
        linv = tl.load(li)
        s_g = tl.zeros([BLOCK], ACC)
        s_gl = tl.zeros([BLOCK], ACC)
        for i0 in range(0, N, BLOCK):
            i = i0 + nn
            m = i < N
            g = tl.load(gs + _node_offsets(i, n, gs_sb, gs_sn), mask=m, other=0.0).to(ACC)
            lhat = (tl.load(l + _node_offsets(i, n, l_sb, l_sn), mask=m, other=0.0).to(ACC) - lmean) * linv
            s_g += g
            s_gl += g * lhat
        glb = tl.sum(s_g, 0)
        glw = tl.sum(s_gl, 0)
        if k == 0:
            tl.store(grad_lb, glb.to(grad_lb.dtype.element_ty))
            tl.store(grad_lw, glw.to(grad_lw.dtype.element_ty))
        lscale = tl.load(lw).to(ACC) * linv
        mk = tl.load(hm + k)
        ik = tl.load(hi + k)
        wk = tl.load(hw + k).to(ACC)
        bk = tl.load(hb + k).to(ACC)
        w2k = tl.load(w2 + k * w2_s).to(ACC)
        s_w2 = tl.zeros([BLOCK], ACC)
        s_b = tl.zeros([BLOCK], ACC)
        s_w = tl.zeros([BLOCK], ACC)
        for i0 in range(0, N, BLOCK):  # the sums over the nodes
            i = i0 + nn
            dl, xhat, pre, gk = _head_bwd_block(gs, gs_sb, gs_sn, l, l_sb, l_sn, h, h_sb, h_sc, h_sn, i, k, n, N,
                                                lmean, linv, lscale, glb, glw, mk, ik, wk, bk, w2k, BATCH_STATS)
            s_w2 += tl.where(i < N, dl * tl.maximum(pre, 0.0), 0.0)
            s_b += gk
            s_w += gk * xhat
        gb = tl.sum(s_b, 0)
        gw = tl.sum(s_w, 0)
        for i0 in range(0, N, BLOCK):  # grad_h
            i = i0 + nn
            dl, xhat, pre, gk = _head_bwd_block(gs, gs_sb, gs_sn, l, l_sb, l_sn, h, h_sb, h_sc, h_sn, i, k, n, N,
                                                lmean, linv, lscale, glb, glw, mk, ik, wk, bk, w2k, BATCH_STATS)
            if BATCH_STATS:
                gh = (wk * ik) * (gk - gb / N - xhat * gw / N)
            else:
                gh = (wk * ik) * gk
            tl.store(grad_h + k.to(tl.int64) * gh_sc + _node_offsets(i, n, gh_sb, gh_sn),
                     gh.to(grad_h.dtype.element_ty), mask=i < N)
        tl.store(grad_w2 + k, tl.sum(s_w2, 0).to(grad_w2.dtype.element_ty))
        tl.store(grad_hb + k, gb.to(grad_hb.dtype.element_ty))
        tl.store(grad_hw + k, gw.to(grad_hw.dtype.element_ty))
