/* scratch.h - a fresh temporary directory per cmocka test, removed afterwards.
 * Test support shared by the unit tests that write files (checkpoints, converted
 * models). */
#ifndef CPM_TEST_SCRATCH_H
#define CPM_TEST_SCRATCH_H

typedef struct scratch {
    char dir[256];
} scratch;

/* cmocka setup: *state becomes a scratch with an empty directory under $TMPDIR
 * (or /tmp). */
int scratch_setup(void **state);

/* cmocka teardown: removes the directory and frees the scratch. */
int scratch_teardown(void **state);

#endif
