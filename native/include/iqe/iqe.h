/* libiqe C API: IQE-CLIP engines and the Python runtime's preprocessing, from C and any
 * language with a C FFI. Every function returns a status; no C++ exception crosses this
 * boundary. On failure iqe_last_error() holds a one-line message (per thread) with the same
 * text the Python runtime gives for the same problem. */
#ifndef IQE_IQE_H
#define IQE_IQE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum iqe_status {
    IQE_OK = 0,
    IQE_INPUT_ERROR = 1,     /* a file or option the caller can fix */
    IQE_ENGINE_MISMATCH = 2, /* manifest refused: rebuild the engine (message names the command) */
    IQE_RUNTIME_ERROR = 3    /* anything else (backend failure, out of memory) */
} iqe_status;

typedef struct iqe_engine iqe_engine;

/* Scores of one image (the fused graph's per-image outputs). */
typedef struct iqe_scores {
    float score, score_query, score_text, score_few, map_max;
} iqe_scores;

const char* iqe_version(void);
const char* iqe_last_error(void);

/* Opens ENGINE_DIR for backend "onnxruntime" | "tensorrt" and precision "fp32" | "fp16",
 * checking its manifest like the Python loader; threads 0 = all CPUs. */
iqe_status iqe_engine_open(const char* engine_dir, const char* backend, const char* precision, int threads,
                           iqe_engine** out);
void iqe_engine_close(iqe_engine* engine);
int iqe_engine_image_size(const iqe_engine* engine);

/* images: float32 [batch, 3, S, S]; scores: batch entries; map / map_smooth: NULL or
 * batch * S * S floats each. */
iqe_status iqe_engine_score(iqe_engine* engine, const float* images, int batch, iqe_scores* scores, float* map,
                            float* map_smooth);

/* `iqe score` in one call: reads `inputs` (files and folders), scores them in batches of
 * `batch`, writes OUT_DIR/results.jsonl and .iqe-run.jsonl (and maps/NNNNNN.npz per scored
 * item when save_maps), like `iqe score`. Unreadable inputs become error rows, as in the
 * command line; *scored receives the number of scored items. */
iqe_status iqe_score_files(iqe_engine* engine, const char* const* inputs, int n_inputs, const char* out_dir,
                           int save_maps, int batch, int* scored);

/* The model input of one PNG/JPEG/single-frame DICOM file: float32 [3, size, size], the
 * Python runtime's preprocessing (default DICOM windows). */
iqe_status iqe_preprocess_file(const char* path, int size, float* out);

#ifdef __cplusplus
}
#endif

#endif /* IQE_IQE_H */
