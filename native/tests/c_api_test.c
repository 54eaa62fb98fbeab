/* The C API from plain C: errors come back as status codes with the runtime's messages. */
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "iqe/iqe.h"

static int failures = 0;

static void expect(int ok, const char* what) {
    if (!ok) {
        fprintf(stderr, "FAIL: %s (last error: %s)\n", what, iqe_last_error());
        ++failures;
    }
}

/* usage: iqe_c_api_test TMP_DIR [ENGINE_DIR OUT_DIR INPUT...] */
int main(int argc, char** argv) {
    const char* dir = argc > 1 ? argv[1] : "c_api_test_tmp";
    char path[4096], want[8192];
    iqe_engine* engine = NULL;
    float image[3 * 8 * 8];
    FILE* f;

    mkdir(dir, 0755);
    expect(iqe_engine_open(dir, "onnxruntime", "fp32", 1, &engine) == IQE_ENGINE_MISMATCH, "empty engine dir refused");
    snprintf(want, sizeof want,
             "%s: no onnxruntime fp32 engine (manifest.onnxruntime.fp32.json missing); "
             "run `iqe build %s --backend onnxruntime --precision fp32`", dir, dir);
    expect(strcmp(iqe_last_error(), want) == 0, "missing-manifest message");
    expect(engine == NULL, "no handle on failure");

    expect(iqe_engine_open(dir, "onnxruntime", "fp64", 1, &engine) == IQE_INPUT_ERROR, "bad precision refused");

    snprintf(path, sizeof path, "%s/missing.png", dir);
    expect(iqe_preprocess_file(path, 8, image) == IQE_INPUT_ERROR, "missing file");
    snprintf(want, sizeof want, "%s: no such file or folder", path);
    expect(strcmp(iqe_last_error(), want) == 0, "missing-file message");

    snprintf(path, sizeof path, "%s/garbage.png", dir);
    f = fopen(path, "wb");
    fputs("not a png", f);
    fclose(f);
    expect(iqe_preprocess_file(path, 8, image) == IQE_INPUT_ERROR, "garbage file");
    snprintf(want, sizeof want, "%s: cannot decode image (UnidentifiedImageError: cannot identify image file '%s')",
             path, path);
    expect(strcmp(iqe_last_error(), want) == 0, "garbage-file message");

    expect(iqe_engine_score(NULL, image, 1, NULL, NULL, NULL) == IQE_INPUT_ERROR, "null engine");

    /* With an engine and inputs: score them like `iqe-native score ENGINE INPUT... --out OUT --save-maps`. */
    if (argc > 4) {
        int scored = -1;
        const char* const* inputs = (const char* const*)(argv + 4);
        expect(iqe_engine_open(argv[2], "onnxruntime", "fp32", 0, &engine) == IQE_OK, "engine opens");
        if (engine != NULL) {
            expect(iqe_engine_image_size(engine) > 0, "image size");
            expect(iqe_score_files(engine, inputs, argc - 4, argv[3], 1, 4, &scored) == IQE_OK, "score files");
            expect(scored > 0, "something scored");
            iqe_engine_close(engine);
        }
    }
    if (failures == 0) printf("c_api: all checks passed\n");
    return failures == 0 ? 0 : 1;
}
