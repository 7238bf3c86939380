/* Convolution and max pooling on channels-last (NHWC) images, for one float type: included by
 * _cpu_kernels.c once with T = float and once with T = double, as _cpu_kernels.h is. The
 * includer defines T, NAME(f) and GEMM, the row-major BLAS gemm of T.
 *
 * The formulas are those of gpunet/conv.py's NumPy path, which stays the reference: Conv2d is
 * im2col then one product, cols[(n, oh, ow), (i, j, c)] = x[n, oh*sh + i - ph, ow*sw + j - pw, c]
 * (zero outside the image), y = cols @ W (K x O, rows in (i, j, c) order) + b. What changes is
 * where cols lives. NumPy writes the whole matrix (29 MB for the small CNN's second layer at
 * batch 128), reads it back in the product, and backward writes and reads dcols as large again.
 * Here cols is made a tile of rows at a time, in a buffer that stays in cache, and each tile is
 * consumed by its product at once:
 *
 *     forward    per tile: im2col, y_tile = cols_tile @ W, then bias and ReLU on y_tile
 *     backward   per tile: dz_tile = dy_tile masked by y_tile > 0 (the fused ReLU), bias sums,
 *                im2col again, dW += cols_tileᵀ @ dz_tile, dcols_tile = dz_tile @ Wᵀ, col2im
 *
 * Rows of tiles are whole output pixels, so every product is a plain gemm on contiguous memory.
 * Sums over rows (the bias gradient, dW through beta = 1) add tiles in row order.
 *
 * Each function takes a range of images [img0, img1): the caller runs ranges on several threads
 * (one BLAS thread each), and col2im's scatter never crosses from one image into another. */

/* Rows [r0, r0 + rows) of the im2col matrix of x (g->n, g->h, g->w, g->c) into cols. */
static INLINE void NAME(im2col)(const T* restrict x, T* restrict cols, const ConvGeometry* g,
                         Py_ssize_t r0, Py_ssize_t rows) {
    const Py_ssize_t c = g->c, kc = g->kw * c, k = g->kh * kc, pixels = g->oh * g->ow;
    for (Py_ssize_t r = 0; r < rows; ++r) {
        const Py_ssize_t p = r0 + r, img = p / pixels, oy = p % pixels / g->ow, ox = p % g->ow;
        const Py_ssize_t iy0 = oy * g->sh - g->ph, ix0 = ox * g->sw - g->pw;
        const T* restrict image = x + img * g->h * g->w * c;
        T* restrict dst = cols + r * k;
        for (Py_ssize_t i = 0; i < g->kh; ++i, dst += kc) {
            const Py_ssize_t iy = iy0 + i;
            if (iy < 0 || iy >= g->h) {
                for (Py_ssize_t t = 0; t < kc; ++t) dst[t] = 0;
                continue;
            }
            const T* restrict row = image + iy * g->w * c;
            if (ix0 >= 0 && ix0 + g->kw <= g->w) {  /* the whole window row is inside */
                const T* restrict src = row + ix0 * c;
                for (Py_ssize_t t = 0; t < kc; ++t) dst[t] = src[t];
                continue;
            }
            for (Py_ssize_t j = 0; j < g->kw; ++j) {
                const Py_ssize_t ix = ix0 + j;
                T* restrict d = dst + j * c;
                if (ix < 0 || ix >= g->w)
                    for (Py_ssize_t t = 0; t < c; ++t) d[t] = 0;
                else
                    for (Py_ssize_t t = 0; t < c; ++t) d[t] = row[ix * c + t];
            }
        }
    }
}

/* col2im of rows [r0, r0 + rows): each column of dcols is added back onto the pixel it was
 * read from (padding positions are dropped). dx must hold the sums of the earlier rows. */
static INLINE void NAME(col2im)(const T* restrict dcols, T* restrict dx, const ConvGeometry* g,
                         Py_ssize_t r0, Py_ssize_t rows) {
    const Py_ssize_t c = g->c, kc = g->kw * c, k = g->kh * kc, pixels = g->oh * g->ow;
    for (Py_ssize_t r = 0; r < rows; ++r) {
        const Py_ssize_t p = r0 + r, img = p / pixels, oy = p % pixels / g->ow, ox = p % g->ow;
        const Py_ssize_t iy0 = oy * g->sh - g->ph, ix0 = ox * g->sw - g->pw;
        T* restrict image = dx + img * g->h * g->w * c;
        const T* restrict src = dcols + r * k;
        for (Py_ssize_t i = 0; i < g->kh; ++i, src += kc) {
            const Py_ssize_t iy = iy0 + i;
            if (iy < 0 || iy >= g->h) continue;
            T* restrict row = image + iy * g->w * c;
            if (ix0 >= 0 && ix0 + g->kw <= g->w) {
                T* restrict dst = row + ix0 * c;
                for (Py_ssize_t t = 0; t < kc; ++t) dst[t] += src[t];
                continue;
            }
            for (Py_ssize_t j = 0; j < g->kw; ++j) {
                const Py_ssize_t ix = ix0 + j;
                if (ix >= 0 && ix < g->w)
                    for (Py_ssize_t t = 0; t < c; ++t) row[ix * c + t] += src[j * c + t];
            }
        }
    }
}

/* Max pooling of x (N, H, W, C) into y (N, OH, OW, C), with the window offset (row-major, 0 to
 * kh*kw - 1) of each first maximum into index (NULL: none). As numpy's maximum, a NaN in a
 * window gives NaN; the index moves only on a strictly greater value, so ties and NaN keep the
 * earlier offset, as conv.py's NumPy path does. */
VECTOR_CLONES static void NAME(max_pool_forward)(const T* restrict x, T* restrict y, uint8_t* restrict index,
                                   const ConvGeometry* g, Py_ssize_t img0, Py_ssize_t img1) {
    const Py_ssize_t c = g->c;
    for (Py_ssize_t img = img0; img < img1; ++img)
        for (Py_ssize_t oy = 0; oy < g->oh; ++oy)
            for (Py_ssize_t ox = 0; ox < g->ow; ++ox) {
                const Py_ssize_t p = (img * g->oh + oy) * g->ow + ox;
                T* restrict best = y + p * c;
                uint8_t* restrict at = index ? index + p * c : NULL;
                const T* base = x + ((img * g->h + oy * g->sh) * g->w + ox * g->sw) * c;
                for (Py_ssize_t t = 0; t < c; ++t) best[t] = base[t];
                if (at) memset(at, 0, (size_t)c);
                for (Py_ssize_t i = 0; i < g->kh; ++i)
                    for (Py_ssize_t j = i ? 0 : 1; j < g->kw; ++j) {
                        const T* restrict v = base + (i * g->w + j) * c;
                        const uint8_t offset = (uint8_t)(i * g->kw + j);
                        if (at)
                            for (Py_ssize_t t = 0; t < c; ++t) at[t] = v[t] > best[t] ? offset : at[t];
                        for (Py_ssize_t t = 0; t < c; ++t) {
                            const T b = best[t], u = v[t];
                            best[t] = u > b || u != u ? u : b;
                        }
                    }
            }
}

/* dx (N, H, W, C) = zeros, plus dy * (index == t) at each window's offset t: as conv.py's NumPy
 * path, which multiplies, so a NaN or inf in dy reaches every pixel of its window. */
VECTOR_CLONES static void NAME(max_pool_backward)(const T* restrict dy, const uint8_t* restrict index,
                                    T* restrict dx, const ConvGeometry* g, Py_ssize_t img0,
                                    Py_ssize_t img1) {
    const Py_ssize_t c = g->c, image = g->h * g->w * c;
    memset(dx + img0 * image, 0, (size_t)((img1 - img0) * image) * sizeof(T));
    for (Py_ssize_t img = img0; img < img1; ++img)
        for (Py_ssize_t oy = 0; oy < g->oh; ++oy)
            for (Py_ssize_t ox = 0; ox < g->ow; ++ox) {
                const Py_ssize_t p = (img * g->oh + oy) * g->ow + ox;
                const T* restrict up = dy + p * c;
                const uint8_t* restrict at = index + p * c;
                T* base = dx + ((img * g->h + oy * g->sh) * g->w + ox * g->sw) * c;
                for (Py_ssize_t i = 0; i < g->kh; ++i)
                    for (Py_ssize_t j = 0; j < g->kw; ++j) {
                        T* restrict d = base + (i * g->w + j) * c;
                        const uint8_t offset = (uint8_t)(i * g->kw + j);
                        for (Py_ssize_t t = 0; t < c; ++t) {
                            const T u = up[t];
                            d[t] += at[t] == offset ? u : u * (T)0;  /* up * (index == t) */
                        }
                    }
            }
}

/* Whether cols is x itself: a 1x1 kernel, stride 1, no padding. */
static INLINE int NAME(conv_is_pointwise)(const ConvGeometry* g) {
    return g->kh == 1 && g->kw == 1 && g->sh == 1 && g->sw == 1 && g->ph == 0 && g->pw == 0;
}

/* The rows of y (M, O) = im2col(x) @ w (K, O) + b, then max(., 0) when relu, of images
 * [img0, img1); b may be NULL. `buf` holds tile x K values. ReLU is `v < 0 ? 0 : v`, so that
 * NaN passes through, as in bias_relu.
 *
 * With g->pool (a max pooling of window and stride g->pool that follows, fused), y is never
 * written: each tile's rows go to `buf`'s last tile x O values, and are pooled from there into
 * pooled (N, QH, QW, O) and index (its offsets, NULL: none), as max_pool_forward does. Tiles are
 * then whole images (the caller's tile is a multiple of OH x OW). */
VECTOR_CLONES static void NAME(conv_forward)(const T* restrict x, const T* restrict w, const T* restrict b,
                               T* restrict y, T* restrict buf, const ConvGeometry* g,
                               Py_ssize_t tile, int relu, Py_ssize_t img0, Py_ssize_t img1,
                               T* restrict pooled, uint8_t* restrict index) {
    const Py_ssize_t pixels = g->oh * g->ow, k = g->kh * g->kw * g->c, o = g->o;
    const Py_ssize_t m = img1 * pixels;
    const int pointwise = NAME(conv_is_pointwise)(g);
    for (Py_ssize_t r0 = img0 * pixels; r0 < m; r0 += tile) {
        const Py_ssize_t rows = m - r0 < tile ? m - r0 : tile;
        const T* a = x + r0 * k;
        if (!pointwise) {
            NAME(im2col)(x, buf, g, r0, rows);
            a = buf;
        }
        T* restrict out = g->pool ? buf + tile * k : y + r0 * o;
        GEMM(ROW_MAJOR, NO_TRANS, NO_TRANS, rows, o, k, (T)1, a, k, w, o, (T)0, out, o);
        if (b || relu)
            for (Py_ssize_t r = 0; r < rows; ++r) {
                T* restrict v = out + r * o;
                if (b)
                    for (Py_ssize_t j = 0; j < o; ++j) v[j] += b[j];
                if (relu)
                    for (Py_ssize_t j = 0; j < o; ++j) v[j] = v[j] < (T)0 ? (T)0 : v[j];
            }
        if (g->pool) {  /* this tile's images, pooled as MaxPool2d(g->pool) pools y */
            const Py_ssize_t first = r0 / pixels, q = g->qh * g->qw * o;
            ConvGeometry p = {.n = rows / pixels, .h = g->oh, .w = g->ow, .c = o, .kh = g->pool,
                              .kw = g->pool, .sh = g->pool, .sw = g->pool, .oh = g->qh,
                              .ow = g->qw};
            NAME(max_pool_forward)(out, pooled + first * q, index ? index + first * q : NULL, &p,
                                   0, p.n);
        }
    }
}

/* dz (images, OH, OW, O) of `images` images from the gradient dy of their pooled output (see
 * conv_backward): dy at each window's maximum where pooled > 0, else 0. */
static INLINE void NAME(unpool)(const T* restrict dy, const T* restrict pooled,
                         const uint8_t* restrict index, T* restrict dz, const ConvGeometry* g,
                         Py_ssize_t images) {
    const Py_ssize_t o = g->o, pk = g->pool;
    memset(dz, 0, (size_t)(images * g->oh * g->ow * o) * sizeof(T));  /* pixels no window covers */
    for (Py_ssize_t img = 0; img < images; ++img)
        for (Py_ssize_t qy = 0; qy < g->qh; ++qy)
            for (Py_ssize_t qx = 0; qx < g->qw; ++qx) {
                const Py_ssize_t p = (img * g->qh + qy) * g->qw + qx;
                const T* restrict up = dy + p * o;
                const T* restrict top = pooled + p * o;
                const uint8_t* restrict at = index + p * o;
                T* base = dz + ((img * g->oh + qy * pk) * g->ow + qx * pk) * o;
                for (Py_ssize_t i = 0; i < pk; ++i)
                    for (Py_ssize_t j = 0; j < pk; ++j) {
                        T* restrict d = base + (i * g->ow + j) * o;
                        const uint8_t offset = (uint8_t)(i * pk + j);
                        for (Py_ssize_t t = 0; t < o; ++t) {
                            const T u = up[t], kept = top[t] > (T)0 ? u : (T)0;
                            d[t] = at[t] == offset ? kept : (T)0;
                        }
                    }
            }
}

/* Backward of conv_forward for upstream dy (M, O), over the rows of images [img0, img1): their
 * share of dw (K, O) = colsᵀ @ dz (overwritten), of the column sums of dz into sums (O; NULL:
 * none), and, when dx is not NULL, their images of dx (N, H, W, C) = col2im(dz @ wᵀ)
 * (overwritten). dz = dy where y > 0 (else 0) when y is given (the fused ReLU), else dy. buf
 * holds tile x K values and dzbuf tile x O.
 *
 * With g->pool (conv_forward's fused pooling), dy is the gradient of the pooled output (N, QH,
 * QW, O), `pooled` that output and index its offsets: dz, a tile of whole images at a time, is
 * dy at each window's maximum where the pooled value is > 0 (the ReLU), and 0 elsewhere, which
 * is MaxPool2d's then the ReLU's backward for any finite dy. (Unfused, a NaN or inf in dy also
 * reaches the window's other pixels that are > 0, through MaxPool2d's dy * (index == t); here
 * it stays at the maximum, as in PyTorch.) */
VECTOR_CLONES static void NAME(conv_backward)(const T* restrict x, const T* restrict w, const T* restrict dy,
                                const T* restrict y, T* restrict dw, T* restrict sums,
                                T* restrict dx, T* restrict buf, T* restrict dzbuf,
                                const ConvGeometry* g, Py_ssize_t tile, Py_ssize_t img0,
                                Py_ssize_t img1, const T* restrict pooled,
                                const uint8_t* restrict index) {
    const Py_ssize_t pixels = g->oh * g->ow, k = g->kh * g->kw * g->c, o = g->o;
    const Py_ssize_t first = img0 * pixels, m = img1 * pixels, image = g->h * g->w * g->c;
    const int pointwise = NAME(conv_is_pointwise)(g);
    if (sums)
        for (Py_ssize_t j = 0; j < o; ++j) sums[j] = 0;
    if (dx && !pointwise) memset(dx + img0 * image, 0, (size_t)((img1 - img0) * image) * sizeof(T));
    if (m == first) memset(dw, 0, (size_t)(k * o) * sizeof(T));
    for (Py_ssize_t r0 = first; r0 < m; r0 += tile) {
        const Py_ssize_t rows = m - r0 < tile ? m - r0 : tile;
        const T* dz = dy + r0 * o;
        if (g->pool) {
            const Py_ssize_t first = r0 / pixels, q = g->qh * g->qw * o;
            NAME(unpool)(dy + first * q, pooled + first * q, index + first * q, dzbuf, g,
                         rows / pixels);
            dz = dzbuf;
        } else if (y) {
            const T* restrict out = y + r0 * o;
            const T* restrict up = dz;
            for (Py_ssize_t t = 0; t < rows * o; ++t) {
                const T v = up[t];
                dzbuf[t] = out[t] > (T)0 ? v : (T)0;
            }
            dz = dzbuf;
        }
        if (sums)
            for (Py_ssize_t r = 0; r < rows; ++r)
                for (Py_ssize_t j = 0; j < o; ++j) sums[j] += dz[r * o + j];
        const T* a = x + r0 * k;
        if (!pointwise) {
            NAME(im2col)(x, buf, g, r0, rows);
            a = buf;
        }
        GEMM(ROW_MAJOR, TRANS, NO_TRANS, k, o, rows, (T)1, a, k, dz, o, r0 > first ? (T)1 : (T)0,
             dw, o);
        if (!dx) continue;
        if (pointwise) {
            GEMM(ROW_MAJOR, NO_TRANS, TRANS, rows, k, o, (T)1, dz, o, w, o, (T)0, dx + r0 * k, k);
        } else {
            GEMM(ROW_MAJOR, NO_TRANS, TRANS, rows, k, o, (T)1, dz, o, w, o, (T)0, buf, k);
            NAME(col2im)(buf, dx, g, r0, rows);
        }
    }
}
