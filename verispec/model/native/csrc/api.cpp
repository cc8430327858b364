// The C ABI that verispec/model/native/__init__.py binds with ctypes: a whole forward in one call,
// and the single kernels the tests check against references.
#include <Python.h>

#include <mutex>
#include <vector>

#include "matmul.h"
#include "ops.h"
#include "vnni.h"
#include "wide.h"

namespace vs {

struct LayerWeights {
  Matrix q, k, v, o, gate, up, down;
  const float *attn_norm, *mlp_norm, *q_norm, *k_norm, *post_attn_norm, *post_mlp_norm;  // null: absent
  const float *q_bias, *k_bias, *v_bias;                                                  // null: absent
  const float *rope_cos, *rope_sin;  // [context, head_dim] of this layer's kind (global, sliding)
  int32_t window;                    // keys a query sees, itself included; 0: all
};

struct Model {
  int32_t layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, activation;
  float eps, embed_scale, query_scale;
  Matrix embed, lm_head;
  const float* final_norm;
  const LayerWeights* layer;
};

struct Batch {  // the new rows of several sequences, each continuing its own cache
  int32_t rows, segments;
  const int32_t* token_ids;  // [rows]
  const int32_t* positions;  // [rows]
  const int32_t* first_row;  // [segments + 1]: segment s owns rows [first_row[s], first_row[s + 1])
  float* const* k_cache;     // [segments], each [layers, kv_heads, stride, head_dim]
  float* const* v_cache;
  const int32_t* stride;     // [segments]: positions per (layer, kv head) in each cache's storage
  int32_t outputs;           // rows whose logits are wanted
  const int32_t* output_rows;
  float* logits;             // [outputs, vocab]
  int32_t int8;              // activations quantized for the int8 kernels
  // Draft trees; both null when every row is a chain (row r at slot positions[r], seeing slots 0..it).
  const int32_t* parent;     // [rows]: row r's parent row in the batch; -1: r sees its cache's slots 0..its own
  const int32_t* slot;       // [rows]: where row r's key and value go in its cache
  // Hidden states to hand back (EAGLE-3 features); null when none is asked for.
  int32_t captures;
  const int32_t* capture_layers;  // [captures]: the residual stream entering layer capture_layers[c] (layers: leaving the last)
  float* features;                // [rows, captures, hidden]
};

static Pool pool;
static std::mutex busy;  // one forward at a time: the pool serves one caller

static void each_row(int rows, const std::function<void(int)>& f) { pool.run(rows, f); }

static const QuantRows* quantize(bool int8, const std::vector<float>& x, int rows, int cols, QuantRows& q) {
  if (!int8) return nullptr;
  quantize_rows(x.data(), rows, cols, cols, q);
  return &q;
}

static void forward(const Model& m, const Batch& b) {
  const int R = b.rows, H = m.hidden, I = m.intermediate, d = m.head_dim;
  const int qn = m.heads * d, kvn = m.kv_heads * d, qkvn = qn + 2 * kvn, group = m.heads / m.kv_heads;
  std::vector<float> x(static_cast<size_t>(R) * H), h(x.size()), o(x.size());
  std::vector<float> qkv(static_cast<size_t>(R) * qkvn), att(static_cast<size_t>(R) * qn);
  std::vector<float> gu(static_cast<size_t>(R) * 2 * I);
  std::vector<int> segment(R);
  for (int s = 0; s < b.segments; s++)
    for (int r = b.first_row[s]; r < b.first_row[s + 1]; r++) segment[r] = s;
  QuantRows xq;
  const bool int8 = b.int8 != 0;
  // keys[r]: the slots a tree node reads, in the order of the chain that ends at it (empty: a chain row)
  std::vector<std::vector<int32_t>> keys(R);
  for (int r = 0; b.parent != nullptr && r < R; r++) {
    const int p = b.parent[r];
    if (p < 0) continue;
    if (keys[p].empty())
      for (int t = 0; t <= b.slot[p]; t++) keys[r].push_back(t);
    else
      keys[r] = keys[p];
    keys[r].push_back(b.slot[r]);
  }

  each_row(R, [&](int r) {
    float* xr = &x[static_cast<size_t>(r) * H];
    decode_row(m.embed, b.token_ids[r], xr);
    if (m.embed_scale != 1.0f)
      for (int i = 0; i < H; i++) xr[i] *= m.embed_scale;
  });
  auto capture = [&](int L) {
    for (int c = 0; c < b.captures; c++)
      if (b.capture_layers[c] == L)
        for (int r = 0; r < R; r++)
          memcpy(b.features + (static_cast<int64_t>(r) * b.captures + c) * H, &x[static_cast<size_t>(r) * H],
                 H * sizeof(float));
  };
  for (int L = 0; L < m.layers; L++) {
    capture(L);
    const LayerWeights& w = m.layer[L];
    auto cache_at = [&](float* const* caches, int r, int kvh) {
      return caches[segment[r]] + (static_cast<int64_t>(L * m.kv_heads + kvh) * b.stride[segment[r]]) * d;
    };
    // 1. attention: norm, q k v, per-head norms, RoPE, the cache, attention, output projection
    each_row(R, [&](int r) { rms_norm(&x[r * H], w.attn_norm, m.eps, H, &h[r * H]); });
    const Matrix qkv_parts[3] = {w.q, w.k, w.v};
    matmul(pool, qkv_parts, 3, R, h.data(), H, quantize(int8, h, R, H, xq), qkv.data(), qkvn);
    each_row(R, [&](int r) {
      float* row = &qkv[static_cast<size_t>(r) * qkvn];
      const float* biases[3] = {w.q_bias, w.k_bias, w.v_bias};
      const int sizes[3] = {qn, kvn, kvn}, offsets[3] = {0, qn, qn + kvn};
      for (int p = 0; p < 3; p++)
        if (biases[p] != nullptr)
          for (int i = 0; i < sizes[p]; i++) row[offsets[p] + i] += biases[p][i];
      const int pos = b.positions[r], slot = b.slot != nullptr ? b.slot[r] : pos;
      for (int hh = 0; hh < m.heads + m.kv_heads; hh++) {  // query heads, then key heads
        float* head = row + hh * d;
        const float* norm = hh < m.heads ? w.q_norm : w.k_norm;
        if (norm != nullptr) rms_norm(head, norm, m.eps, d, head);
        rope(head, w.rope_cos + static_cast<int64_t>(pos) * d, w.rope_sin + static_cast<int64_t>(pos) * d, d);
      }
      for (int kvh = 0; kvh < m.kv_heads; kvh++) {
        memcpy(cache_at(b.k_cache, r, kvh) + static_cast<int64_t>(slot) * d, row + qn + kvh * d, d * sizeof(float));
        memcpy(cache_at(b.v_cache, r, kvh) + static_cast<int64_t>(slot) * d, row + qn + kvn + kvh * d,
               d * sizeof(float));
      }
    });
    pool.run(R * m.heads, [&](int item) {
      const int r = item / m.heads, hh = item % m.heads, kvh = hh / group, pos = b.positions[r];
      const int first = w.window > 0 && pos - w.window + 1 > 0 ? pos - w.window + 1 : 0;
      thread_local std::vector<float> scores;
      scores.resize(pos + 1);
      const float *q = &qkv[static_cast<size_t>(r) * qkvn + hh * d], *k = cache_at(b.k_cache, r, kvh),
                  *v = cache_at(b.v_cache, r, kvh);
      float* out = &att[static_cast<size_t>(r) * qn + hh * d];
      const std::vector<int32_t>& tree_keys = keys[r];
      if (tree_keys.empty())
        attend(q, k, v, first, pos, d, m.query_scale, scores.data(), out, [](int t) { return t; });
      else
        attend(q, k, v, first, pos, d, m.query_scale, scores.data(), out, [&](int t) { return tree_keys[t]; });
    });
    matmul(pool, &w.o, 1, R, att.data(), qn, quantize(int8, att, R, qn, xq), o.data(), H);
    each_row(R, [&](int r) {
      float* orow = &o[r * H];
      if (w.post_attn_norm != nullptr) rms_norm(orow, w.post_attn_norm, m.eps, H, orow);
      for (int i = 0; i < H; i++) x[r * H + i] += orow[i];
      rms_norm(&x[r * H], w.mlp_norm, m.eps, H, &h[r * H]);
    });
    // 2. MLP: gate and up side by side, act(gate) * up, down
    const Matrix gate_up[2] = {w.gate, w.up};
    matmul(pool, gate_up, 2, R, h.data(), H, quantize(int8, h, R, H, xq), gu.data(), 2 * I);
    each_row(R, [&](int r) { gated(m.activation, &gu[static_cast<size_t>(r) * 2 * I], &gu[static_cast<size_t>(r) * 2 * I + I], I); });
    const QuantRows* gq = nullptr;
    if (int8) {
      quantize_rows(gu.data(), R, 2 * I, I, xq);
      gq = &xq;
    }
    matmul(pool, &w.down, 1, R, gu.data(), 2 * I, gq, o.data(), H);
    each_row(R, [&](int r) {
      float* orow = &o[r * H];
      if (w.post_mlp_norm != nullptr) rms_norm(orow, w.post_mlp_norm, m.eps, H, orow);
      for (int i = 0; i < H; i++) x[r * H + i] += orow[i];
    });
  }
  capture(m.layers);
  // 3. the final norm and the LM head, for the rows whose logits are wanted
  if (b.outputs == 0) return;
  std::vector<float> out(static_cast<size_t>(b.outputs) * H);
  for (int j = 0; j < b.outputs; j++) rms_norm(&x[b.output_rows[j] * H], m.final_norm, m.eps, H, &out[j * H]);
  matmul(pool, &m.lm_head, 1, b.outputs, out.data(), H, quantize(int8, out, b.outputs, H, xq), b.logits, m.vocab);
}

}  // namespace vs

// Only the C ABI below is exported (setup.py compiles with -fvisibility=hidden).
#define VS_API __attribute__((visibility("default")))

extern "C" {

VS_API void vs_set_threads(int n) {
  std::lock_guard<std::mutex> lock(vs::busy);
  vs::pool.resize(n);
}

VS_API int vs_threads() { return vs::pool.size(); }

VS_API void vs_forward(const vs::Model* model, const vs::Batch* batch) {
  std::lock_guard<std::mutex> lock(vs::busy);
  vs::forward(*model, *batch);
}

// y [M, W.rows] = x [M, W.cols] W^T, exact or int8
VS_API void vs_matmul(const vs::Matrix* W, int M, const float* x, float* y, int int8) {
  std::lock_guard<std::mutex> lock(vs::busy);
  vs::QuantRows xq;
  if (int8) vs::quantize_rows(x, M, W->cols, W->cols, xq);
  vs::matmul(vs::pool, W, 1, M, x, W->cols, int8 ? &xq : nullptr, y, W->rows);
}

// rows [first, first + count) of W as floats -> out [count, W.cols]
VS_API void vs_decode_rows(const vs::Matrix* W, int first, int count, float* out) {
  for (int r = 0; r < count; r++) vs::decode_row(*W, first + r, out + static_cast<int64_t>(r) * W->cols);
}

VS_API void vs_plant_order_bug(int on) { vs::planted_order_bug = on; }

// Use the 16-lane kernels (exact; int8 where the CPU has VNNI too); returns whether they are used now.
VS_API int vs_set_wide(int on) {
  std::lock_guard<std::mutex> lock(vs::busy);
  vs::use_wide = on && vs::has_wide();
  vs::use_vnni = on && vs::has_vnni();
  return vs::use_wide;
}

}  // extern "C"

// An importable module, so that Python finds this library where the package is installed.
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "verispec's CPU kernels (ctypes ABI)", -1,
                                    nullptr};
PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
