/* compare.c - checks cpm-run's output for one golden folder against the
 * independent float64 reference: rel = max|got-ref| / max|ref| within the
 * tolerance, argmax identical at every prompt position, greedy ids identical.
 * With MIN_ARGMAX (a fraction), a lossy precision mode's bar instead: rel within
 * the tolerance and at least that fraction of prompt positions with the same
 * argmax; the greedy run is reported, not required (one changed token changes
 * every later one).
 *
 *   golden-compare REF_DIR LOGITS_FILE GREEDY_FILE TOLERANCE [MIN_ARGMAX]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static float *read_f32(const char *path, long *ret_n) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    rewind(f);
    float *d = malloc((size_t)bytes + 4);
    if (d && fread(d, 1, (size_t)bytes, f) != (size_t)bytes) {
        free(d);
        d = NULL;
    }
    fclose(f);
    *ret_n = bytes / 4;
    return d;
}

static int read_ids(const char *path, int *ids, int cap) {
    FILE *f = fopen(path, "r");
    int n = 0;
    if (!f)
        return -1;
    while (n < cap && fscanf(f, "%d", &ids[n]) == 1)
        n++;
    fclose(f);
    return n;
}

static long argmax(const float *x, long n) {
    long b = 0;
    for (long i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return b;
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: golden-compare REF_DIR LOGITS GREEDY TOLERANCE [MIN_ARGMAX]\n");
        return 2;
    }
    char path[4096];
    int ids[4096], ref_greedy[64], got_greedy[64];
    snprintf(path, sizeof path, "%s/ids.txt", argv[1]);
    int n = read_ids(path, ids, 4096);
    snprintf(path, sizeof path, "%s/ref_greedy.txt", argv[1]);
    int ng = read_ids(path, ref_greedy, 64);
    int nh = read_ids(argv[3], got_greedy, 64);
    long nr, nw;
    snprintf(path, sizeof path, "%s/ref_logits.f32", argv[1]);
    float *ref = read_f32(path, &nr), *got = read_f32(argv[2], &nw);
    double tol = atof(argv[4]);
    if (n <= 0 || ng <= 0 || !ref || !got) {
        fprintf(stderr, "golden-compare: cannot read inputs\n");
        return 2;
    }
    if (nr != nw || nr % n) {
        fprintf(stderr, "FAIL: logits have %ld values, reference %ld (%d positions)\n", nw, nr, n);
        return 1;
    }
    long V = nr / n;
    double maxdiff = 0, maxref = 0;
    int agree = 0;
    for (long i = 0; i < nr; i++) {
        double d = fabs((double)got[i] - ref[i]);
        maxdiff = d > maxdiff || isnan(d) ? d : maxdiff;
        maxref = fabs(ref[i]) > maxref ? fabs(ref[i]) : maxref;
    }
    for (int r = 0; r < n; r++)
        agree += argmax(got + r * V, V) == argmax(ref + r * V, V);
    int same = 0;
    for (int i = 0; i < ng && i < nh; i++)
        same += got_greedy[i] == ref_greedy[i];
    double rel = maxdiff / maxref;
    int ok = rel <= tol && agree == n && same == ng && nh == ng;
    if (argc == 6) /* a lossy mode's bar */
        ok = rel <= tol && agree >= atof(argv[5]) * n && nh == ng;
    printf("%s %s: rel %.3g (tol %g), argmax %d/%d, greedy %d/%d\n", ok ? "PASS" : "FAIL",
           argv[1], rel, tol, agree, n, same, ng);
    free(ref);
    free(got);
    return ok ? 0 : 1;
}
