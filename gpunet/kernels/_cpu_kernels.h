/* The kernels of _cpu_kernels.c for one float type: included once with T = float and once with
 * T = double, as the CUDA kernels are templates. The includer defines T, NAME(f) (f with the
 * type's suffix) and the libm functions EXP, LOG and SQRT for T. */

/* y = max(y + b, 0) in place; `v < 0` so that NaN passes through, as numpy's maximum does. */
static void NAME(bias_relu)(T* restrict y, const T* restrict b, Py_ssize_t n, Py_ssize_t c) {
    for (Py_ssize_t i = 0; i < n; ++i) {
        T* row = y + i * c;
        for (Py_ssize_t j = 0; j < c; ++j) {
            T v = row[j] + b[j];
            row[j] = v < (T)0 ? (T)0 : v;
        }
    }
}

/* dz = dy where y > 0, else 0; the column sums of dz, rows added in order, go to `sums` (NULL:
 * none). With db given (beta != 0), db = sums + beta * db afterwards: the rows are summed first
 * and then added to the old values once, as BLAS gemm adds a product into beta * C. */
static void NAME(relu_backward)(const T* restrict dy, const T* restrict y, T* restrict dz,
                                T* restrict sums, T* restrict db, T beta, Py_ssize_t n,
                                Py_ssize_t c) {
    if (sums) memset(sums, 0, (size_t)c * sizeof(T));
    for (Py_ssize_t i = 0; i < n; ++i) {
        const T* restrict g = dy + i * c;
        const T* restrict out = y + i * c;
        T* restrict z = dz + i * c;
        for (Py_ssize_t j = 0; j < c; ++j) {
            const T v = g[j];  /* loaded unconditionally: the select then has no branch */
            z[j] = out[j] > (T)0 ? v : (T)0;
        }
        if (sums)
            for (Py_ssize_t j = 0; j < c; ++j) sums[j] += z[j];
    }
    if (db)
        for (Py_ssize_t j = 0; j < c; ++j) db[j] = sums[j] + beta * db[j];
}

/* One row of the cross-entropy (the formula is in functional.py): writes the row's gradient
 * and returns its loss. coef, alpha, beta and gamma are the row's factors, eps_c = eps / C,
 * ts the target (0 on an ignored row, whose factors are all 0). */
static double NAME(ce_row)(const T* restrict x, T* restrict g, Py_ssize_t c,
                           const T* restrict weight, T eps_c, Py_ssize_t ts, int valid, T coef,
                           T alpha, T beta, T gamma) {
    T m = -(T)INFINITY;
    int nan = 0;
    for (Py_ssize_t j = 0; j < c; ++j) {
        m = x[j] > m ? x[j] : m;
        nan |= x[j] != x[j];
    }
    /* lse = m + log_sum, but lse - x is formed max first, (m - x) + log_sum: m + log_sum would
     * be rounded to the spacing of m (1e-3 at 1e4 in float32) before x is taken from it. */
    T log_sum = 0;
    if (!nan && isfinite(m)) {
        T s = 0;
        for (Py_ssize_t j = 0; j < c; ++j) {
            g[j] = EXP(x[j] - m);
            s += g[j];
        }
        log_sum = LOG(s);
        T a = alpha / s;  /* p = e / s, and alpha * p, in one multiply */
        for (Py_ssize_t j = 0; j < c; ++j) g[j] *= a;
    } else {  /* NaN poisons the row; for an all -inf (or a +inf) row, lse = m */
        m = nan ? (T)NAN : m;
        for (Py_ssize_t j = 0; j < c; ++j) g[j] = alpha * EXP(x[j] - m);
    }
    g[ts] -= beta;
    T smooth = 0;
    if (eps_c != 0) {
        for (Py_ssize_t j = 0; j < c; ++j) {
            T w = weight ? weight[j] : (T)1;
            g[j] -= gamma * eps_c * w;
            smooth += w * ((m - x[j]) + log_sum);
        }
    }
    return valid ? (double)(coef * ((m - x[ts]) + log_sum) + eps_c * smooth) : 0.0;
}

/* Loss and gradient of a batch; reduction 0 mean, 1 sum, 2 none (loss then has a value per
 * row). Returns the first row whose label is out of range, having written nothing, or -1. */
static Py_ssize_t NAME(cross_entropy)(const T* restrict x, const int64_t* restrict t,
                                      const T* restrict weight, T* restrict grad,
                                      T* restrict loss, Py_ssize_t n, Py_ssize_t c,
                                      int64_t ignore_index, T eps, T grad_output, int reduction) {
    double den = 0;  /* the denominator of "mean": the summed weights of the kept rows */
    for (Py_ssize_t i = 0; i < n; ++i) {
        if (t[i] == ignore_index) continue;
        if (t[i] < 0 || t[i] >= c) return i;
        den += weight ? (double)weight[t[i]] : 1.0;
    }
    T w_sum = (T)c;
    if (weight && eps != 0) {
        w_sum = 0;
        for (Py_ssize_t j = 0; j < c; ++j) w_sum += weight[j];
    }
    const T inv_den = reduction == 0 ? (den != 0 ? (T)(1.0 / den) : (T)0) : (T)1;
    const T scale = grad_output * inv_den, eps_c = eps / (T)c;
    double total = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
        const int valid = t[i] != ignore_index;
        const Py_ssize_t ts = valid ? (Py_ssize_t)t[i] : 0;
        const T w_t = valid ? (weight ? weight[ts] : (T)1) : (T)0;
        const T coef = ((T)1 - eps) * w_t;
        const T big_a = coef + (valid ? eps_c * w_sum : (T)0);
        const T gamma = valid ? scale : (T)0;
        double row = NAME(ce_row)(x + i * c, grad + i * c, c, weight, eps_c, ts, valid, coef,
                                  gamma * big_a, gamma * coef, gamma);
        if (reduction == 2)
            loss[i] = (T)row;
        else
            total += row;
    }
    if (reduction != 2) loss[0] = (T)(reduction == 0 ? total * inv_den : total);
    return -1;
}

/* PyTorch's SGD rule in one pass over the flat buffers (the CUDA kernel's sgd_one), with a
 * loop per case so that each compiles to straight vector code. */
static void NAME(sgd)(T* restrict p, const T* restrict g, T* restrict buf, Py_ssize_t n, T lr,
                      T momentum, T dampening, T weight_decay, int nesterov, int first) {
    if (momentum == 0) {
        for (Py_ssize_t i = 0; i < n; ++i) p[i] -= lr * (g[i] + weight_decay * p[i]);
    } else if (first) {
        const T factor = nesterov ? (T)1 + momentum : (T)1;
        for (Py_ssize_t i = 0; i < n; ++i) {
            T d = g[i] + weight_decay * p[i];
            buf[i] = d;
            p[i] -= lr * (factor * d);
        }
    } else if (nesterov) {
        for (Py_ssize_t i = 0; i < n; ++i) {
            T d = g[i] + weight_decay * p[i];
            T b = momentum * buf[i] + ((T)1 - dampening) * d;
            buf[i] = b;
            p[i] -= lr * (d + momentum * b);
        }
    } else {
        for (Py_ssize_t i = 0; i < n; ++i) {
            T b = momentum * buf[i] + ((T)1 - dampening) * (g[i] + weight_decay * p[i]);
            buf[i] = b;
            p[i] -= lr * b;
        }
    }
}

/* Adam in one pass (the CUDA kernel's adam_one); bc1 and bc2_sqrt are the bias corrections. */
static void NAME(adam)(T* restrict p, const T* restrict g, T* restrict m, T* restrict v,
                       Py_ssize_t n, T lr, T b1, T b2, T eps, T weight_decay, int decoupled,
                       T bc1, T bc2_sqrt) {
    const T keep = decoupled ? (T)1 - lr * weight_decay : (T)1;
    const T l2 = decoupled ? (T)0 : weight_decay, step = lr / bc1;
    for (Py_ssize_t i = 0; i < n; ++i) {
        T gi = g[i] + l2 * p[i];
        T mi = b1 * m[i] + ((T)1 - b1) * gi;
        T vi = b2 * v[i] + ((T)1 - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * keep - step * mi / (SQRT(vi) / bc2_sqrt + eps);
    }
}
