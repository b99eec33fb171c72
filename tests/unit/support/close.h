/* close.h - the kernel tests' closeness check: the relative (Frobenius) error of
 * a matrix of results against a reference, failing the cmocka test above tol.
 * Include after <cmocka.h>. */
#ifndef CPM_TEST_CLOSE_H
#define CPM_TEST_CLOSE_H

#include <math.h>
#include <stddef.h>

static inline void check_close(const float *y, const float *ref, int M, int N, double tol,
                               const char *what) {
    double num = 0, den = 0;
    for (size_t i = 0; i < (size_t)M * (size_t)N; i++) {
        num += ((double)y[i] - ref[i]) * ((double)y[i] - ref[i]);
        den += (double)ref[i] * ref[i];
    }
    if (!(sqrt(num / den) <= tol))
        fail_msg("%s: relative error %.3g over %.3g", what, sqrt(num / den), tol);
}

#endif
