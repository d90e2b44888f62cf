// The reconstruction montage and its bitmap font; see montage.h.
#include "infer/montage.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <map>

#include "core/error.h"
#include "io/io.h"

namespace mae {

namespace {

// 5x7 glyphs, one byte per row, bit 4 = leftmost column.
struct Glyph {
  char c;
  uint8_t rows[7];
};

// clang-format off
constexpr Glyph kFont[] = {
    {'A', {0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11}}, {'B', {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E}},
    {'C', {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E}}, {'D', {0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C}},
    {'E', {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F}}, {'F', {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10}},
    {'G', {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F}}, {'H', {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11}},
    {'I', {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E}}, {'J', {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C}},
    {'K', {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11}}, {'L', {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F}},
    {'M', {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11}}, {'N', {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11}},
    {'O', {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}}, {'P', {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10}},
    {'Q', {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D}}, {'R', {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11}},
    {'S', {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E}}, {'T', {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}},
    {'U', {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}}, {'V', {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04}},
    {'W', {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A}}, {'X', {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11}},
    {'Y', {0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04}}, {'Z', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F}},
    {'0', {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E}}, {'1', {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E}},
    {'2', {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F}}, {'3', {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E}},
    {'4', {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02}}, {'5', {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E}},
    {'6', {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E}}, {'7', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}},
    {'8', {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E}}, {'9', {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C}},
    {' ', {0, 0, 0, 0, 0, 0, 0}},                      {'.', {0, 0, 0, 0, 0, 0x0C, 0x0C}},
    {',', {0, 0, 0, 0, 0x0C, 0x04, 0x08}},             {':', {0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0}},
    {';', {0, 0x0C, 0x0C, 0, 0x0C, 0x04, 0x08}},       {'-', {0, 0, 0, 0x1F, 0, 0, 0}},
    {'+', {0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0}},       {'=', {0, 0, 0x1F, 0, 0x1F, 0, 0}},
    {'(', {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}}, {')', {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08}},
    {'[', {0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E}}, {']', {0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E}},
    {'/', {0, 0x01, 0x02, 0x04, 0x08, 0x10, 0}},       {'%', {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03}},
    {'>', {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08}}, {'<', {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02}},
    {'|', {0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}}, {'_', {0, 0, 0, 0, 0, 0, 0x1F}},
    {'\'', {0x0C, 0x04, 0x08, 0, 0, 0, 0}},            {'?', {0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04}},
    {'!', {0x04, 0x04, 0x04, 0x04, 0x04, 0, 0x04}},    {'*', {0, 0x04, 0x15, 0x0E, 0x15, 0x04, 0}},
    {'#', {0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A}},
};
// clang-format on

const uint8_t* glyph_rows(char c) {
  static const std::map<char, const uint8_t*> table = [] {
    std::map<char, const uint8_t*> t;
    for (const auto& g : kFont) t[g.c] = g.rows;
    return t;
  }();
  const char u = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  const auto it = table.find(u);
  return it != table.end() ? it->second : table.at('?');
}

constexpr int kScale = 2;                  // font pixels per glyph pixel
constexpr int64_t kLine = 7 * kScale + 6;  // text line height
constexpr int64_t kMargin = 10;            // space between cells and around the picture
constexpr std::array<uint8_t, 3> kBackground{24, 24, 24};
constexpr std::array<uint8_t, 3> kText{235, 235, 235};
constexpr std::array<uint8_t, 3> kEdgeText{255, 215, 0};
constexpr std::array<uint8_t, 3> kMaskedColour{70, 100, 175};

constexpr const char* kPlanes[3] = {"axial", "coronal", "sagittal"};

// Letters {normal group, screen-right, screen-down} of each plane in the radiological view.
struct PlaneView {
  const char* normal;  // the two letters of the axis the plane is perpendicular to
  char right;          // anatomical direction towards the right of the screen
  char down;           // ... and towards its bottom
};

PlaneView plane_view(const std::string& plane) {
  if (plane == "axial") return {"SI", 'L', 'P'};
  if (plane == "coronal") return {"AP", 'L', 'I'};
  return {"LR", 'P', 'I'};
}

char opposite(char c) {
  switch (c) {
    case 'L':
      return 'R';
    case 'R':
      return 'L';
    case 'A':
      return 'P';
    case 'P':
      return 'A';
    case 'S':
      return 'I';
    default:
      return 'S';
  }
}

// Index axis (0 = x, 1 = y, 2 = z) whose orientation letter is one of `letters`.
int index_axis_of(const std::string& code, const char* letters) {
  for (int i = 0; i < 3; ++i) {
    if (code[i] == letters[0] || code[i] == letters[1]) return i;
  }
  throw InputError("orientation " + code + " has no axis along " + letters);
}

int tensor_axis(int index_axis) { return 2 - index_axis; }  // x -> W (2), y -> H (1), z -> D (0)

std::string format_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

// Voxel indices (along an index axis of `n` voxels) sampled by `pixels` screen pixels, flipped when
// the axis runs against the screen direction.
at::Tensor sample_positions(int64_t n, int64_t pixels, bool flip) {
  std::vector<int64_t> idx(static_cast<size_t>(pixels));
  for (int64_t p = 0; p < pixels; ++p) {
    int64_t v = static_cast<int64_t>(std::floor((p + 0.5) * static_cast<double>(n) / static_cast<double>(pixels)));
    v = std::clamp<int64_t>(v, 0, n - 1);
    idx[static_cast<size_t>(p)] = flip ? n - 1 - v : v;
  }
  return at::tensor(idx, at::kLong);
}

// One row's panels on the screen grid.
struct PanelGrid {
  at::Tensor rows, cols;  // voxel index per screen row / column along the row / column tensor axis
  int row_axis = 0, col_axis = 0, normal_axis = 0;
  char left = 'R', right = 'L', top = 'A', bottom = 'P';
};

PanelGrid panel_grid(const Volume& v, const ResolvedSlice& s, double px_per_mm) {
  const std::string code = orientation_code(v);
  const auto view = plane_view(s.plane);
  const char right_pair[3] = {view.right, opposite(view.right), 0};
  const char down_pair[3] = {view.down, opposite(view.down), 0};
  const int ic = index_axis_of(code, right_pair);
  const int ir = index_axis_of(code, down_pair);
  const auto shape = v.shape_dhw();
  PanelGrid g;
  g.col_axis = tensor_axis(ic);
  g.row_axis = tensor_axis(ir);
  g.normal_axis = s.axis;
  const int64_t nc = shape[g.col_axis], nr = shape[g.row_axis];
  const int64_t pc = std::max<int64_t>(1, std::llround(nc * v.spacing[ic] * px_per_mm));
  const int64_t pr = std::max<int64_t>(1, std::llround(nr * v.spacing[ir] * px_per_mm));
  g.cols = sample_positions(nc, pc, code[ic] != view.right);
  g.rows = sample_positions(nr, pr, code[ir] != view.down);
  g.right = view.right;
  g.left = opposite(view.right);
  g.bottom = view.down;
  g.top = opposite(view.down);
  return g;
}

// x: (D, H, W) -> the panel (rows, cols) of grid g at slice `index`.
at::Tensor sample_panel(const at::Tensor& x, const PanelGrid& g, int64_t index) {
  at::Tensor s = x.select(g.normal_axis, index);  // remaining axes in increasing tensor-axis order
  if (g.row_axis > g.col_axis) s = s.t();
  return s.index_select(0, g.rows).index_select(1, g.cols).contiguous();
}

// Grey panel (rows, cols) -> uint8 (rows, cols, 3).
at::Tensor grey(const at::Tensor& panel, double lo, double hi) {
  const auto g = ((panel - lo) / (hi - lo)).clamp(0.0, 1.0).mul(255.0).round().to(at::kByte);
  return at::stack({g, g, g}, -1);
}

void paste(at::Tensor& canvas, const at::Tensor& rgb, int64_t x, int64_t y) {
  canvas.narrow(0, y, rgb.size(0)).narrow(1, x, rgb.size(1)).copy_(rgb);
}

}  // namespace

SliceSpec parse_slice_spec(const std::string& text) {
  const auto colon = text.find(':');
  SliceSpec s;
  s.plane = text.substr(0, colon);
  std::transform(s.plane.begin(), s.plane.end(), s.plane.begin(), [](unsigned char c) { return std::tolower(c); });
  if (s.plane != "axial" && s.plane != "coronal" && s.plane != "sagittal") {
    throw ConfigError("--slice " + text + ": the plane must be axial, coronal or sagittal (e.g. axial:45)");
  }
  if (colon != std::string::npos) {
    const std::string num = text.substr(colon + 1);
    if (num.empty() || num.size() > 9 ||
        !std::all_of(num.begin(), num.end(), [](unsigned char c) { return std::isdigit(c); })) {
      throw ConfigError("--slice " + text + ": the index after ':' must be a non-negative integer (e.g. axial:45)");
    }
    s.index = std::stoll(num);
  }
  return s;
}

std::vector<ResolvedSlice> resolve_slices(const Volume& volume, const std::vector<SliceSpec>& specs) {
  std::vector<SliceSpec> wanted = specs;
  if (wanted.empty()) {
    for (const char* p : kPlanes) wanted.push_back({p, std::nullopt});
  }
  const std::string code = orientation_code(volume);
  const auto shape = volume.shape_dhw();
  std::vector<ResolvedSlice> out;
  for (const auto& spec : wanted) {
    const int ia = index_axis_of(code, plane_view(spec.plane).normal);
    ResolvedSlice r;
    r.plane = spec.plane;
    r.axis = tensor_axis(ia);
    const int64_t n = shape[r.axis];
    r.index = spec.index.value_or(n / 2);
    if (r.index < 0 || r.index >= n) {
      throw ConfigError("--slice " + spec.plane + ":" + std::to_string(r.index) +
                        ": index out of range; the preprocessed volume has " + std::to_string(n) + " " + spec.plane +
                        " slices (0.." + std::to_string(n - 1) + ")");
    }
    r.label = spec.plane + " " + std::string(1, "xyz"[ia]) + "=" + std::to_string(r.index);
    out.push_back(r);
  }
  return out;
}

int64_t text_width(const std::string& text, int scale) {
  return text.empty() ? 0 : static_cast<int64_t>(text.size()) * 6 * scale - scale;
}

void draw_text(at::Tensor& image, int64_t x, int64_t y, const std::string& text, int scale,
               const std::array<uint8_t, 3>& rgb) {
  TORCH_CHECK(image.dim() == 3 && image.size(2) == 3 && image.scalar_type() == at::kByte && image.is_contiguous(),
              "draw_text needs a contiguous uint8 (H, W, 3) image");
  const int64_t h = image.size(0), w = image.size(1);
  uint8_t* p = image.data_ptr<uint8_t>();
  for (size_t i = 0; i < text.size(); ++i) {
    const uint8_t* rows = glyph_rows(text[i]);
    const int64_t gx = x + static_cast<int64_t>(i) * 6 * scale;
    for (int r = 0; r < 7; ++r) {
      for (int c = 0; c < 5; ++c) {
        if (!(rows[r] & (0x10 >> c))) continue;
        for (int dy = 0; dy < scale; ++dy) {
          for (int dx = 0; dx < scale; ++dx) {
            const int64_t py = y + r * scale + dy, px = gx + c * scale + dx;
            if (py < 0 || py >= h || px < 0 || px >= w) continue;
            std::copy(rgb.begin(), rgb.end(), p + (py * w + px) * 3);
          }
        }
      }
    }
  }
}

at::Tensor render_montage(const MontageInputs& in) {
  TORCH_CHECK(in.input != nullptr, "render_montage needs an input volume");
  const Volume& v = *in.input;
  const auto x = v.data[0].to(at::kFloat);
  const auto rec = in.reconstruction[0].to(at::kFloat);
  const auto mask = in.mask[0].to(at::kFloat);
  TORCH_CHECK(rec.sizes() == x.sizes() && mask.sizes() == x.sizes(), "render_montage: input ", x.sizes(),
              ", reconstruction ", rec.sizes(), " and mask ", mask.sizes(), " differ");

  // Shared grey window: 1st..99th percentile of the input.
  const auto sorted = std::get<0>(x.flatten().sort());
  const int64_t n = sorted.numel();
  double lo = sorted[static_cast<int64_t>(0.01 * static_cast<double>(n - 1))].item<double>();
  double hi = sorted[static_cast<int64_t>(0.99 * static_cast<double>(n - 1))].item<double>();
  if (!(hi > lo)) {
    lo = sorted[0].item<double>();
    hi = sorted[n - 1].item<double>();
  }
  if (!(hi > lo)) hi = lo + 1.0;
  const double err_full = (hi - lo) / 2.0;

  // Square pixels in mm: the largest physical extent maps to target_panel_px pixels.
  const auto shape = v.shape_dhw();
  double max_extent = 0.0;
  for (int i = 0; i < 3; ++i)
    max_extent = std::max(max_extent, static_cast<double>(shape[tensor_axis(i)]) * v.spacing[i]);
  const double px_per_mm = in.target_panel_px / max_extent;

  const std::vector<std::string> col_titles = {"original", "masked (blue=hidden)", "reconstruction",
                                               "error (recon-orig)"};
  std::vector<PanelGrid> grids;
  int64_t col_w = 0, label_w = 0;
  for (const auto& t : col_titles) col_w = std::max(col_w, text_width(t, kScale));
  for (const auto& s : in.slices) {
    grids.push_back(panel_grid(v, s, px_per_mm));
    col_w = std::max(col_w, grids.back().cols.numel());
    const auto space = s.label.find(' ');
    label_w = std::max(
        {label_w, text_width(s.label.substr(0, space), kScale), text_width(s.label.substr(space + 1), kScale)});
  }

  std::vector<std::string> legend = {
      "view: radiological (patient right on image left); yellow letters mark the directions",
      "square pixels of " + format_number(1.0 / px_per_mm) + " mm; grey window [" + format_number(lo) + ", " +
          format_number(hi) + "] = 1st-99th percentile of the input",
      "error: orange = too bright, blue = too dark, full colour at +-" + format_number(err_full) +
          "; visible voxels are copied from the input (error 0)",
  };
  if (v.channels() > 1) legend.push_back("channel 0 of " + std::to_string(v.channels()) + " shown");
  for (const auto& f : in.footer) legend.push_back(f);

  int64_t width = kMargin + label_w + kMargin + 4 * (col_w + kMargin);
  for (const auto& t : in.title) width = std::max(width, 2 * kMargin + text_width(t, kScale));
  for (const auto& t : legend) width = std::max(width, 2 * kMargin + text_width(t, kScale));
  std::vector<int64_t> row_h;
  int64_t height = kMargin + static_cast<int64_t>(in.title.size()) * kLine + kLine;
  for (const auto& g : grids) {
    row_h.push_back(std::max<int64_t>(g.rows.numel(), 2 * kLine));
    height += row_h.back() + kMargin;
  }
  height += static_cast<int64_t>(legend.size()) * kLine + kMargin;

  at::Tensor canvas = at::empty({height, width, 3}, at::kByte);
  for (int c = 0; c < 3; ++c) canvas.select(2, c).fill_(kBackground[c]);

  int64_t y = kMargin;
  for (const auto& t : in.title) {
    draw_text(canvas, kMargin, y, t, kScale, kText);
    y += kLine;
  }
  const int64_t x0 = kMargin + label_w + kMargin;
  for (size_t c = 0; c < col_titles.size(); ++c) {
    const int64_t cx = x0 + static_cast<int64_t>(c) * (col_w + kMargin);
    draw_text(canvas, cx + (col_w - text_width(col_titles[c], kScale)) / 2, y, col_titles[c], kScale, kText);
  }
  y += kLine;

  const auto masked_rgb = at::tensor(std::vector<int64_t>(kMaskedColour.begin(), kMaskedColour.end())).to(at::kByte);
  for (size_t r = 0; r < grids.size(); ++r) {
    const auto& g = grids[r];
    const auto& s = in.slices[r];
    const auto space = s.label.find(' ');
    draw_text(canvas, kMargin, y + row_h[r] / 2 - kLine, s.label.substr(0, space), kScale, kText);
    draw_text(canvas, kMargin, y + row_h[r] / 2, s.label.substr(space + 1), kScale, kText);

    const auto px = sample_panel(x, g, s.index);
    const auto pr = sample_panel(rec, g, s.index);
    const auto pm = sample_panel(mask, g, s.index) > 0.5;
    const auto original = grey(px, lo, hi);
    const auto masked = at::where(pm.unsqueeze(-1), masked_rgb.view({1, 1, 3}), original);
    const auto recon = grey(pr, lo, hi);
    const auto e = ((pr - px) / err_full).clamp(-1.0, 1.0);
    const auto pos = e.clamp_min(0.0), neg = (-e).clamp_min(0.0);
    const auto error = at::stack({pos * 255.0, pos * 150.0 + neg * 140.0, neg * 255.0}, -1).round().to(at::kByte);

    const int64_t ph = g.rows.numel(), pw = g.cols.numel();
    const int64_t py = y + (row_h[r] - ph) / 2;
    const at::Tensor panels[4] = {original, masked, recon, error};
    for (int c = 0; c < 4; ++c) {
      const int64_t cx = x0 + c * (col_w + kMargin) + (col_w - pw) / 2;
      paste(canvas, panels[c], cx, py);
      if (c == 0) {
        const int64_t glyph_h = 7 * kScale;
        draw_text(canvas, cx + 2, py + (ph - glyph_h) / 2, std::string(1, g.left), kScale, kEdgeText);
        draw_text(canvas, cx + pw - 2 - text_width("L", kScale), py + (ph - glyph_h) / 2, std::string(1, g.right),
                  kScale, kEdgeText);
        draw_text(canvas, cx + (pw - text_width("L", kScale)) / 2, py + 2, std::string(1, g.top), kScale, kEdgeText);
        draw_text(canvas, cx + (pw - text_width("L", kScale)) / 2, py + ph - 2 - glyph_h, std::string(1, g.bottom),
                  kScale, kEdgeText);
      }
    }
    y += row_h[r] + kMargin;
  }
  for (const auto& t : legend) {
    draw_text(canvas, kMargin, y, t, kScale, kText);
    y += kLine;
  }
  return canvas;
}

}  // namespace mae
