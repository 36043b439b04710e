// Python binding of the native decode layer: a DecodeLayer object built once per
// model layer (it keeps its weight arrays alive) and stepped once per token.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/array_check.h"
#include "common/cpu_features.h"
#include "model/decode_layer.h"
#include "ternary/ternary.h"

namespace py = pybind11;

namespace r3mes {
namespace {

const char* const kProjectionNames[kNumProjections] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"};

std::string dims(std::size_t a, std::size_t b) {
  return "[" + std::to_string(a) + ", " + std::to_string(b) + "]";
}

class PyDecodeLayer {
 public:
  PyDecodeLayer(std::size_t hidden, std::size_t intermediate, std::size_t heads,
                std::size_t kv_heads, std::size_t head_dim, float eps, float attn_scaling,
                const std::string& activation, const py::array& input_norm,
                const py::array& post_norm, const py::object& attn_sub_norm,
                const py::object& ffn_sub_norm, const std::vector<py::tuple>& projections) {
    if (hidden == 0 || intermediate == 0 || heads == 0 || kv_heads == 0 || head_dim == 0)
      throw std::invalid_argument("DecodeLayer: every dimension must be > 0");
    if (heads % kv_heads != 0)
      throw std::invalid_argument("DecodeLayer: heads must be a multiple of kv_heads");
    if (head_dim % 2 != 0) throw std::invalid_argument("DecodeLayer: head_dim must be even");
    if (activation == "relu2") {
      spec_.activation = DecodeActivation::Relu2;
    } else if (activation == "silu") {
      spec_.activation = DecodeActivation::Silu;
    } else {
      throw std::invalid_argument("DecodeLayer: activation must be 'relu2' or 'silu', got '" +
                                  activation + "'");
    }
    spec_.hidden = hidden;
    spec_.intermediate = intermediate;
    spec_.heads = heads;
    spec_.kv_heads = kv_heads;
    spec_.head_dim = head_dim;
    spec_.eps = eps;
    spec_.attn_scaling = attn_scaling;
    spec_.input_norm = keep_vector(input_norm, "input_norm", hidden);
    spec_.post_norm = keep_vector(post_norm, "post_norm", hidden);
    if (!attn_sub_norm.is_none())
      spec_.attn_sub_norm = keep_vector(py::array::ensure(attn_sub_norm), "attn_sub_norm",
                                        heads * head_dim);
    if (!ffn_sub_norm.is_none())
      spec_.ffn_sub_norm =
          keep_vector(py::array::ensure(ffn_sub_norm), "ffn_sub_norm", intermediate);
    if (projections.size() != kNumProjections)
      throw std::invalid_argument("DecodeLayer: expected 7 projections (q, k, v, o, gate, up, "
                                  "down), got " + std::to_string(projections.size()));
    const std::size_t qn = heads * head_dim, kvn = kv_heads * head_dim;
    const std::size_t want[kNumProjections][2] = {{qn, hidden},   {kvn, hidden},
                                                  {kvn, hidden},  {hidden, qn},
                                                  {intermediate, hidden},
                                                  {intermediate, hidden},
                                                  {hidden, intermediate}};
    for (int i = 0; i < kNumProjections; ++i) {
      const py::tuple& t = projections[i];
      if (t.size() != 3)
        throw std::invalid_argument(std::string(kProjectionNames[i]) +
                                    ": expected (packed, in_features, w_scale)");
      py::array packed = py::array::ensure(t[0]);
      const std::size_t in = t[1].cast<std::size_t>();
      const float w_scale = t[2].cast<float>();
      check_array<uint8_t>(packed, kProjectionNames[i], 2);
      const std::size_t out = packed.shape(0);
      if (out != want[i][0] || in != want[i][1])
        throw std::invalid_argument(std::string(kProjectionNames[i]) + ": weight is " +
                                    dims(out, in) + ", the layer needs " +
                                    dims(want[i][0], want[i][1]));
      if (static_cast<std::size_t>(packed.shape(1)) != packed_row_bytes(in))
        throw std::invalid_argument(std::string(kProjectionNames[i]) +
                                    ": packed rows do not match in_features");
      if (!(w_scale > 0.0f) || !std::isfinite(w_scale))
        throw std::invalid_argument(std::string(kProjectionNames[i]) +
                                    ": w_scale must be a positive finite number");
      keep_.push_back(packed);
      DecodeProjection& p = spec_.proj[i];
      p.packed = data_of<uint8_t>(packed);
      p.out = out;
      p.in = in;
      p.w_scale = w_scale;
    }
  }

  // Sets (or with an empty list clears) the DoRA mix of projection `index`.
  void set_mix(int index, const std::vector<const DoraAdapter*>& adapters,
               const py::object& mix, const py::object& base_weight) {
    if (index < 0 || index >= kNumProjections)
      throw std::invalid_argument("set_mix: projection index must be in [0, 7)");
    DecodeProjection& p = spec_.proj[index];
    const char* name = kProjectionNames[index];
    std::vector<float> mix_values, base_values;
    std::size_t rows = 1;
    if (!adapters.empty()) {
      for (std::size_t e = 0; e < adapters.size(); ++e) {
        const DoraAdapter* ad = adapters[e];
        if (ad == nullptr) throw std::invalid_argument(std::string(name) + ": None adapter");
        if (ad->in != p.in || ad->out != p.out)
          throw std::invalid_argument(std::string(name) + ": adapter " + std::to_string(e) +
                                      " is " + dims(ad->out, ad->in) + ", the weight is " +
                                      dims(p.out, p.in));
      }
      py::array m = py::array::ensure(mix);
      check_array<float>(m, "mix", 2);
      if (static_cast<std::size_t>(m.shape(1)) != adapters.size())
        throw std::invalid_argument(std::string(name) + ": mix has " +
                                    std::to_string(m.shape(1)) + " columns for " +
                                    std::to_string(adapters.size()) + " adapters");
      rows = m.shape(0);
      if (rows == 0) throw std::invalid_argument(std::string(name) + ": mix has no rows");
      const float* mp = data_of<float>(m);
      mix_values.assign(mp, mp + rows * adapters.size());
      for (float w : mix_values)
        if (!std::isfinite(w)) throw std::invalid_argument(std::string(name) + ": mix NaN/Inf");
      if (!base_weight.is_none()) {
        py::array bw = py::array::ensure(base_weight);
        check_array<float>(bw, "base_weight", 1);
        if (static_cast<std::size_t>(bw.shape(0)) != rows)
          throw std::invalid_argument(std::string(name) + ": base_weight needs one value per "
                                      "mix row");
        const float* bp = data_of<float>(bw);
        base_values.assign(bp, bp + rows);
        for (float w : base_values)
          if (!std::isfinite(w))
            throw std::invalid_argument(std::string(name) + ": base_weight NaN/Inf");
      }
    }
    std::vector<float> factor;
    if (!adapters.empty())
      factor = dora_base_factor(adapters, mix_values.data(),
                                base_values.empty() ? nullptr : base_values.data(), rows);
    // A step running on another thread (GIL released) reads the projection: wait for it.
    std::unique_lock<std::mutex> lock(mutex_, std::defer_lock);
    {
      py::gil_scoped_release release;
      lock.lock();
    }
    p.adapters = adapters;
    p.mix = std::move(mix_values);
    p.base_w = std::move(base_values);
    p.mix_rows = rows;
    p.base_factor = std::move(factor);
    adapter_refs_[index] = py::cast(adapters);  // keep the adapters alive
  }

  // One decode step of B rows. k_cache, v_cache: [layers, num_blocks, kv_heads, block_size,
  // head_dim], float32 or float16 (a half cache; a contiguous cache [layers, B, kv_heads,
  // max_len, head_dim] is the same with one block a row). block_table [B, max_blocks]
  // int32: row b's blocks in position order.
  // start, pos [B] int64: row b writes position pos[b] and attends [start[b], pos[b]].
  void step(const py::array& h, const py::array& k_cache, const py::array& v_cache,
            std::size_t layer, const py::array& block_table, const py::array& start,
            const py::array& pos, const py::array& cos, const py::array& sin) {
    check_array<float>(h, "h", 2);
    const std::size_t B = h.shape(0);
    if (static_cast<std::size_t>(h.shape(1)) != spec_.hidden)
      throw std::invalid_argument("h: expected [batch, " + std::to_string(spec_.hidden) + "]");
    if (!h.writeable()) throw std::invalid_argument("h: must be writeable (updated in place)");
    check_cache(k_cache, "k_cache", layer);
    check_cache(v_cache, "v_cache", layer);
    for (int i = 0; i < 5; ++i)
      if (k_cache.shape(i) != v_cache.shape(i))
        throw std::invalid_argument("k_cache and v_cache must have the same shape");
    if (k_cache.itemsize() != v_cache.itemsize())
      throw std::invalid_argument("k_cache and v_cache must have the same dtype");
    const std::size_t num_blocks = k_cache.shape(1), block_size = k_cache.shape(3);
    check_array<int32_t>(block_table, "block_table", 2);
    if (static_cast<std::size_t>(block_table.shape(0)) != B)
      throw std::invalid_argument("block_table: expected one row per batch row");
    const std::size_t max_blocks = block_table.shape(1);
    check_array<int64_t>(start, "start", 1);
    check_array<int64_t>(pos, "pos", 1);
    if (static_cast<std::size_t>(start.shape(0)) != B ||
        static_cast<std::size_t>(pos.shape(0)) != B)
      throw std::invalid_argument("start, pos: expected one entry per batch row");
    const int32_t* table = data_of<int32_t>(block_table);
    const int64_t* sp = data_of<int64_t>(start);
    const int64_t* pp = data_of<int64_t>(pos);
    for (std::size_t b = 0; b < B; ++b) {
      if (pp[b] < 0 || static_cast<std::size_t>(pp[b]) >= max_blocks * block_size)
        throw std::invalid_argument("pos[" + std::to_string(b) + "] = " +
                                    std::to_string(pp[b]) + " is outside the row's " +
                                    std::to_string(max_blocks * block_size) + " positions");
      if (sp[b] < 0 || sp[b] > pp[b])
        throw std::invalid_argument("start[" + std::to_string(b) + "] must be in [0, pos]");
      for (std::size_t j = 0; j <= static_cast<std::size_t>(pp[b]) / block_size; ++j) {
        const int32_t blk = table[b * max_blocks + j];
        if (blk < 0 || static_cast<std::size_t>(blk) >= num_blocks)
          throw std::invalid_argument("block_table[" + std::to_string(b) + ", " +
                                      std::to_string(j) + "] = " + std::to_string(blk) +
                                      " is not a block of the cache (" +
                                      std::to_string(num_blocks) + " blocks)");
      }
    }
    for (const py::array* t : {&cos, &sin}) {
      check_array<float>(*t, "cos/sin", 2);
      if (static_cast<std::size_t>(t->shape(0)) != B ||
          static_cast<std::size_t>(t->shape(1)) != spec_.head_dim)
        throw std::invalid_argument("cos/sin: expected [batch, head_dim]");
    }
    for (int i = 0; i < kNumProjections; ++i) {
      const DecodeProjection& p = spec_.proj[i];
      if (!p.adapters.empty() && p.mix_rows != 1 && p.mix_rows != B)
        throw std::invalid_argument(std::string(kProjectionNames[i]) + ": mix has " +
                                    std::to_string(p.mix_rows) + " rows for a batch of " +
                                    std::to_string(B));
    }
    const std::size_t per_layer = num_blocks * spec_.kv_heads * block_size * spec_.head_dim;
    float* hp = static_cast<float*>(const_cast<void*>(h.data()));
    KvBlocks kv;
    const std::size_t layer_bytes = layer * per_layer * k_cache.itemsize();
    kv.k = static_cast<char*>(const_cast<void*>(k_cache.data())) + layer_bytes;
    kv.v = static_cast<char*>(const_cast<void*>(v_cache.data())) + layer_bytes;
    kv.type = k_cache.itemsize() == 2 ? KvType::F16 : KvType::F32;
    kv.block_size = block_size;
    kv.max_blocks = max_blocks;
    kv.table = table;
    bool ok;
    {
      py::gil_scoped_release release;
      // One step at a time per layer (set_mix waits for it); the scratch is the calling
      // thread's, so two threads decoding different caches through one model only take
      // turns layer by layer.
      std::lock_guard<std::mutex> lock(mutex_);
      ok = decode_layer_step(spec_, hp, B, kv, sp, pp, data_of<float>(cos), data_of<float>(sin),
                             shared_scratch(), active_simd_level());
    }
    if (!ok) throw std::invalid_argument("decode step: activations contain NaN or Inf");
  }

 private:
  const float* keep_vector(const py::array& a, const char* name, std::size_t n) {
    check_array<float>(a, name, 1);
    if (static_cast<std::size_t>(a.shape(0)) != n)
      throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(n) +
                                  " values, got " + std::to_string(a.shape(0)));
    keep_.push_back(a);
    return data_of<float>(a);
  }

  // A cache of float32 or float16 (KvType), [layers, blocks, kv_heads, block_size, head_dim].
  void check_cache(const py::array& c, const char* name, std::size_t layer) {
    if (c.dtype().kind() != 'f' || (c.itemsize() != 4 && c.itemsize() != 2))
      throw std::invalid_argument(std::string(name) + ": expected dtype float32 or float16, got " +
                                  std::string(py::str(c.dtype())));
    if (c.ndim() != 5)
      throw std::invalid_argument(std::string(name) + ": expected 5-D array, got " +
                                  std::to_string(c.ndim()) + "-D");
    if (!(c.flags() & py::array::c_style))
      throw std::invalid_argument(std::string(name) + ": must be C-contiguous");
    if (!c.writeable()) throw std::invalid_argument(std::string(name) + ": must be writeable");
    if (layer >= static_cast<std::size_t>(c.shape(0)) || c.shape(1) == 0 || c.shape(3) == 0 ||
        static_cast<std::size_t>(c.shape(2)) != spec_.kv_heads ||
        static_cast<std::size_t>(c.shape(4)) != spec_.head_dim)
      throw std::invalid_argument(std::string(name) +
                                  ": expected [layers > layer, blocks, kv_heads, block_size, "
                                  "head_dim]");
  }

  DecodeLayerSpec spec_;
  // The layers' steps on one thread share one scratch: a step leaves nothing in it but
  // capacity, and the next layer then finds the buffers (and its DoraCalls' small vectors)
  // in cache instead of one cold set a layer (DoraCall::prepare at 8 rows with 8 int8
  // experts, 2B-4T shape: 4.5 -> 3.5 ms a step; the scratch's memory: one set, not 30).
  static DecodeScratch& shared_scratch() {
    static thread_local DecodeScratch scratch;
    return scratch;
  }
  std::mutex mutex_;
  std::vector<py::array> keep_;
  py::object adapter_refs_[kNumProjections];
};

}  // namespace

void register_decode_layer_bindings(py::module_& mod) {
  py::class_<PyDecodeLayer>(mod, "DecodeLayer",
                            "One BitNet decoder layer for decode steps (csrc/model/).")
      .def(py::init<std::size_t, std::size_t, std::size_t, std::size_t, std::size_t, float,
                    float, const std::string&, const py::array&, const py::array&,
                    const py::object&, const py::object&, const std::vector<py::tuple>&>(),
           py::arg("hidden"), py::arg("intermediate"), py::arg("heads"), py::arg("kv_heads"),
           py::arg("head_dim"), py::arg("eps"), py::arg("attn_scaling"), py::arg("activation"),
           py::arg("input_norm"), py::arg("post_norm"), py::arg("attn_sub_norm"),
           py::arg("ffn_sub_norm"), py::arg("projections"))
      .def("set_mix", &PyDecodeLayer::set_mix, py::arg("index"), py::arg("adapters"),
           py::arg("mix"), py::arg("base_weight"))
      .def("step", &PyDecodeLayer::step, py::arg("h"), py::arg("k_cache"), py::arg("v_cache"),
           py::arg("layer"), py::arg("block_table"), py::arg("start"), py::arg("pos"),
           py::arg("cos"), py::arg("sin"));
}

}  // namespace r3mes
