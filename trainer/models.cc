#include "trainer/models.h"

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/modules/pooling.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace splitq::trainer {
namespace {

// conv 3x3 (padding 1) + ReLU + maxpool 2.
class ConvBlockImpl : public torch::nn::Module {
 public:
  ConvBlockImpl(int64_t in, int64_t out, const QuantLayerOptions& quant) {
    QuantConv2dOptions o;
    o.in_channels = in;
    o.out_channels = out;
    o.padding = 1;
    o.quant = quant;
    o.quant.input_signed = false;  // pixels in [0, 1], or the previous block's ReLU output
    conv = register_module("conv", QuantConv2d(o));
  }
  at::Tensor forward(const at::Tensor& x) {
    return at::max_pool2d(at::relu(conv->forward(x)), {2, 2});
  }
  QuantConv2d conv{nullptr};
};
TORCH_MODULE(ConvBlock);

class DenseBlockImpl : public torch::nn::Module {
 public:
  DenseBlockImpl(int64_t in, int64_t out, bool relu, bool flatten, const QuantLayerOptions& quant)
      : relu_(relu), flatten_(flatten) {
    fc = register_module("fc", QuantLinear(in, out, true, quant));
  }
  at::Tensor forward(const at::Tensor& x) {
    const at::Tensor y = fc->forward(flatten_ ? x.flatten(1) : x);
    return relu_ ? at::relu(y) : y;
  }
  QuantLinear fc{nullptr};

 private:
  bool relu_, flatten_;
};
TORCH_MODULE(DenseBlock);

class EmbedImpl : public torch::nn::Module {
 public:
  EmbedImpl(int64_t width, int64_t context) : context_(context) {
    tokens = register_module("tokens", torch::nn::Embedding(256, width));
    positions = register_parameter("positions", at::randn({context, width}) * 0.02);
  }
  at::Tensor forward(const at::Tensor& bytes) {
    TORCH_CHECK(bytes.dim() == 2, "ByteTransformer input must be [batch, time]");
    const int64_t t = bytes.size(1);
    TORCH_CHECK(t <= context_, "sequence of ", t, " bytes exceeds the context of ", context_);
    return tokens->forward(bytes) + positions.slice(0, 0, t);
  }
  torch::nn::Embedding tokens{nullptr};
  at::Tensor positions;

 private:
  int64_t context_;
};
TORCH_MODULE(Embed);

class TransformerBlockImpl : public torch::nn::Module {
 public:
  TransformerBlockImpl(int64_t width, int64_t heads, const QuantLayerOptions& quant)
      : heads_(heads) {
    norm1 = register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})));
    norm2 = register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})));
    qkv = register_module("qkv", QuantLinear(width, 3 * width, true, quant));
    proj = register_module("proj", QuantLinear(width, width, true, quant));
    fc1 = register_module("fc1", QuantLinear(width, 4 * width, true, quant));
    fc2 = register_module("fc2", QuantLinear(4 * width, width, true, quant));
  }
  at::Tensor forward(const at::Tensor& x) {
    const int64_t b = x.size(0), t = x.size(1), w = x.size(2), dh = w / heads_;
    const auto parts = qkv->forward(norm1->forward(x)).chunk(3, -1);
    auto split_heads = [&](const at::Tensor& v) {
      return v.view({b, t, heads_, dh}).transpose(1, 2);
    };
    const at::Tensor q = split_heads(parts[0]), k = split_heads(parts[1]),
                     v = split_heads(parts[2]);
    at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(dh));
    const at::Tensor future = at::ones({t, t}, x.options().dtype(at::kBool)).triu(1);
    scores = scores.masked_fill(future, -std::numeric_limits<float>::infinity());
    const at::Tensor attended =
        at::matmul(at::softmax(scores, -1), v).transpose(1, 2).reshape({b, t, w});
    const at::Tensor h = x + proj->forward(attended);
    return h + fc2->forward(at::gelu(fc1->forward(norm2->forward(h))));
  }
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  QuantLinear qkv{nullptr}, proj{nullptr}, fc1{nullptr}, fc2{nullptr};

 private:
  int64_t heads_;
};
TORCH_MODULE(TransformerBlock);

class HeadImpl : public torch::nn::Module {
 public:
  HeadImpl(int64_t width, const QuantLayerOptions& quant) {
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})));
    out = register_module("out", QuantLinear(width, 256, true, quant));
  }
  at::Tensor forward(const at::Tensor& x) { return out->forward(norm->forward(x)); }
  torch::nn::LayerNorm norm{nullptr};
  QuantLinear out{nullptr};
};
TORCH_MODULE(Head);

}  // namespace

std::vector<at::Tensor> SplitModel::parameters() const {
  std::vector<at::Tensor> all = client->parameters();
  for (const auto& p : server->parameters()) all.push_back(p);
  for (const auto& p : head->parameters()) all.push_back(p);
  return all;
}

at::Tensor SplitModel::forward(const at::Tensor& x) {
  at::Tensor y = server->forward(client->forward(x));
  return head->size() > 0 ? head->forward(y) : y;
}

SplitModel FashionMnistCnn(const CnnOptions& o) {
  const int max_split = o.u_shaped ? 2 : 3;
  TORCH_CHECK(o.split_after >= 1 && o.split_after <= max_split, "split_after ", o.split_after,
              " is outside the CNN's 1..", max_split, o.u_shaped ? " (U-shaped)" : "");
  SplitModel m;
  m.client = torch::nn::Sequential();
  m.server = torch::nn::Sequential();
  m.head = torch::nn::Sequential();
  auto add = [&](int index, auto block) {
    torch::nn::Sequential& part =
        index < o.split_after ? m.client : (o.u_shaped && index == 3 ? m.head : m.server);
    part->push_back(block);
  };
  add(0, ConvBlock(1, 32, o.quant));
  add(1, ConvBlock(32, 64, o.quant));
  QuantLayerOptions after_relu = o.quant;
  after_relu.input_signed = false;
  add(2, DenseBlock(64 * 7 * 7, 128, true, true, after_relu));
  add(3, DenseBlock(128, 10, false, false, after_relu));
  m.boundary_channel_axis = 1;
  return m;
}

SplitModel ByteTransformer(const TransformerOptions& o) {
  TORCH_CHECK(o.layers >= 2, "the transformer needs at least 2 layers, got ", o.layers);
  TORCH_CHECK(o.heads >= 1 && o.width % o.heads == 0, "width ", o.width,
              " is not divisible by heads ", o.heads);
  TORCH_CHECK(o.context >= 1, "context must be >= 1");
  TORCH_CHECK(o.split_after >= 1 && o.split_after < o.layers, "split_after ", o.split_after,
              " is outside the transformer's 1..", o.layers - 1);
  SplitModel m;
  m.client = torch::nn::Sequential();
  m.server = torch::nn::Sequential();
  m.head = torch::nn::Sequential();
  m.client->push_back(Embed(o.width, o.context));
  for (int i = 0; i < o.layers; ++i) {
    (i < o.split_after ? m.client : m.server)
        ->push_back(TransformerBlock(o.width, o.heads, o.quant));
  }
  (o.u_shaped ? m.head : m.server)->push_back(Head(o.width, o.quant));
  m.boundary_channel_axis = 2;
  return m;
}

int ApplyLora(SplitModel& model, const std::vector<std::string>& targets,
              const LoraOptions& options) {
  int enabled = 0;
  for (torch::nn::Sequential* part : {&model.client, &model.server, &model.head}) {
    for (const auto& item : (*part)->named_modules()) {
      const std::string& name = item.key();
      const std::string leaf =
          name.substr(name.rfind('.') == std::string::npos ? 0 : name.rfind('.') + 1);
      auto linear = std::dynamic_pointer_cast<QuantLinearImpl>(item.value());
      if (linear && std::find(targets.begin(), targets.end(), leaf) != targets.end()) {
        linear->EnableLora(options);
        ++enabled;
      }
    }
    for (auto& item : (*part)->named_parameters()) {
      const std::string& name = item.key();
      const std::string leaf = name.substr(name.rfind('.') + 1);
      const bool trainable =
          leaf == "lora_a" || leaf == "lora_b" || leaf == "scale" || leaf == "offset";
      item.value().set_requires_grad(trainable);
    }
  }
  return enabled;
}

}  // namespace splitq::trainer
