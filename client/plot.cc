#include "client/plot.h"

#include <plplot/plstream.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

namespace sinkscope::report {
namespace {

// cmap0: background, ink, then the named colours of plot.h (colour-blind-safe Okabe–Ito
// hues where they exist). Ramp colours are appended per figure.
constexpr std::array<std::array<int, 3>, 20> kPalette = {{
    {255, 255, 255},  // 0 background
    {0, 0, 0},        // kInk
    {0, 114, 178},    // kBaseline: blue
    {230, 159, 0},    // kVScale: orange
    {0, 158, 115},    // kBackwardOnly: green
    {150, 150, 150},  // kGray
    {213, 0, 0},      // kHighlight: red
    {213, 0, 0},      // kGroup0: token 0
    {230, 159, 0},    // kGroup1: token 1
    {0, 158, 115},    // kGroup2: tokens 2–3
    {0, 114, 178},    // kGroup3: tokens 4–7
    {204, 121, 167},  // kGroup4: tokens 8–15
    {117, 80, 170},   // kPurple
    {136, 34, 85},    // kSinkLogit: wine
    {204, 121, 167},  // kSoftmaxPlusOne: pink
    {86, 180, 233},   // kGatedOutput: sky blue
    {51, 34, 136},    // kGatedHead: indigo
    {170, 68, 153},   // kGatedValue: magenta
    {153, 153, 51},   // kSigmoid: olive
    {68, 170, 153},   // kSoftpick: teal
}};

// A perceptually ordered ramp (dark blue → teal → yellow), for series over time.
std::array<int, 3> RampColor(double f) {
  static const double stops[][3] = {{0.27, 0.00, 0.33}, {0.23, 0.32, 0.55}, {0.13, 0.57, 0.55},
                                    {0.37, 0.79, 0.38}, {0.99, 0.91, 0.15}};
  f = std::clamp(f, 0.0, 1.0) * 4.0;
  const int i = std::min(static_cast<int>(f), 3);
  const double w = f - i;
  std::array<int, 3> c{};
  for (int k = 0; k < 3; ++k) c[k] = static_cast<int>(std::lround(255 * ((1 - w) * stops[i][k] + w * stops[i + 1][k])));
  return c;
}

bool DeviceAvailable(const char* name) {
  const char** menu = nullptr;
  const char** devices = nullptr;
  int n = 64;
  std::vector<const char*> m(n), d(n);
  menu = m.data();
  devices = d.data();
  plgDevs(&menu, &devices, &n);
  for (int i = 0; i < n; ++i) {
    if (devices[i] != nullptr && std::strcmp(devices[i], name) == 0) return true;
  }
  return false;
}

struct Range {
  double lo = INFINITY, hi = -INFINITY;
  void Add(double v) {
    if (!std::isfinite(v)) return;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  // A range with a margin; a degenerate one is widened so the axis can be drawn.
  std::pair<double, double> Padded(bool integer) const {
    double a = lo, b = hi;
    if (!(a <= b)) a = 0, b = 1;
    if (a == b) {
      const double w = a == 0 ? 1 : std::abs(a) * 0.1;
      a -= w;
      b += w;
    }
    const double m = integer ? 0.5 : 0.05 * (b - a);
    return {a - m, b + m};
  }
};

// Axis labels at the panel's text size, the title a little smaller so a long one fits.
void Labels(plstream& pls, const Panel& panel, double text_scale) {
  pls.lab(panel.x_label.c_str(), panel.y_label.c_str(), "");
  pls.schr(0, 0.85 * text_scale);
  pls.mtex("t", 1.5, 0.5, 0.5, panel.title.c_str());
  pls.schr(0, text_scale);
}

double Coordinate(double v, bool log) {
  if (!log) return v;
  return v > 0 ? std::log10(v) : NAN;
}

void DrawLegend(plstream& pls, const Panel& panel, const std::map<const Series*, int>& colors) {
  std::vector<const Series*> entries;
  for (const Series& s : panel.series) {
    if (!s.label.empty()) entries.push_back(&s);
  }
  if (entries.empty() || !panel.legend) return;
  const int n = static_cast<int>(entries.size());
  std::vector<PLINT> opt(n), text_colors(n, kInk), line_colors(n), line_styles(n, 1), symbol_colors(n),
      symbol_numbers(n, 1), box_colors(n, 0), box_patterns(n, 0);
  std::vector<PLFLT> line_widths(n, 2.0), symbol_scales(n, 0.9), box_scales(n, 0), box_line_widths(n, 0);
  std::vector<const char*> text(n), symbols(n, "•");  // a filled dot
  for (int i = 0; i < n; ++i) {
    const Series& s = *entries[i];
    const int c = colors.at(&s);
    opt[i] = s.style == Style::kPoints ? PL_LEGEND_SYMBOL
             : s.style == Style::kLinePoints ? (PL_LEGEND_LINE | PL_LEGEND_SYMBOL)
                                             : PL_LEGEND_LINE;
    line_colors[i] = symbol_colors[i] = c;
    line_styles[i] = s.style == Style::kDashedLine ? 2 : 1;
    text[i] = s.label.c_str();
  }
  PLFLT w = 0, h = 0;
  pls.legend(&w, &h, PL_LEGEND_BACKGROUND | PL_LEGEND_BOUNDING_BOX,
             PL_POSITION_TOP | PL_POSITION_RIGHT | PL_POSITION_INSIDE, 0.01, 0.01, 0.05, 0, kInk, 1, 0, 0, n,
             opt.data(), 0.6, 0.7, 1.6, 0.0, text_colors.data(), text.data(), box_colors.data(), box_patterns.data(),
             box_scales.data(), box_line_widths.data(), line_colors.data(), line_styles.data(), line_widths.data(),
             symbol_colors.data(), symbol_scales.data(), symbol_numbers.data(), symbols.data());
}

void DrawSeriesPanel(plstream& pls, const Panel& panel, const std::map<const Series*, int>& colors,
                     double text_scale) {
  Range xr, yr;
  for (const Series& s : panel.series) {
    for (size_t i = 0; i < s.x.size(); ++i) {
      const double x = Coordinate(s.x[i], panel.log_x);
      const double y = Coordinate(s.y[i], panel.log_y);
      if (!std::isfinite(x) || !std::isfinite(y)) continue;
      xr.Add(x);
      yr.Add(y);
      if (!s.err.empty()) {
        yr.Add(Coordinate(s.y[i] + s.err[i], panel.log_y));
        yr.Add(Coordinate(s.y[i] - s.err[i], panel.log_y));
      }
    }
  }
  if (panel.reference_y) yr.Add(Coordinate(panel.reference, panel.log_y));
  auto [x0, x1] = xr.Padded(panel.integer_x);
  auto [y0, y1] = yr.Padded(false);
  if (panel.fixed_y) {
    y0 = panel.y_min - 0.05 * (panel.y_max - panel.y_min);
    y1 = panel.y_max + 0.05 * (panel.y_max - panel.y_min);
  }
  // Room at the top for the legend.
  int labelled = 0;
  for (const Series& s : panel.series) labelled += !s.label.empty();
  if (panel.legend && labelled > 0) y1 += (y1 - y0) * (0.08 * labelled + 0.05);
  pls.adv(0);
  pls.vsta();
  pls.wind(x0, x1, y0, y1);
  pls.col0(kInk);
  pls.width(1.0);
  pls.lsty(1);
  // Log data is drawn as log10 on a linear axis (the labels say so): PLplot's log axes
  // label only powers of ten, which leaves a range inside one decade unlabelled.
  pls.box("bcnst", panel.integer_x ? 1.0 : 0.0, panel.integer_x ? 1 : 0, "bcnstv", 0.0, 0);
  Labels(pls, panel, text_scale);
  if (panel.reference_y) {
    const PLFLT rx[] = {x0, x1}, ry[] = {Coordinate(panel.reference, panel.log_y), Coordinate(panel.reference, panel.log_y)};
    pls.col0(kGray);
    pls.lsty(2);
    pls.line(2, rx, ry);
    pls.lsty(1);
  }
  for (const Series& s : panel.series) {
    std::vector<PLFLT> x, y, lo, hi;
    for (size_t i = 0; i < s.x.size(); ++i) {
      const double cx = Coordinate(s.x[i], panel.log_x), cy = Coordinate(s.y[i], panel.log_y);
      if (!std::isfinite(cx) || !std::isfinite(cy)) continue;
      x.push_back(cx);
      y.push_back(cy);
      if (!s.err.empty()) {
        lo.push_back(Coordinate(s.y[i] - s.err[i], panel.log_y));
        hi.push_back(Coordinate(s.y[i] + s.err[i], panel.log_y));
      }
    }
    if (x.empty()) continue;
    pls.col0(colors.at(&s));
    const int n = static_cast<int>(x.size());
    if (s.style != Style::kPoints) {
      pls.width(2.0);
      pls.lsty(s.style == Style::kDashedLine ? 2 : 1);
      pls.line(n, x.data(), y.data());
      pls.lsty(1);
    }
    if (s.style == Style::kPoints || s.style == Style::kLinePoints) {
      pls.ssym(0, s.symbol_size);
      pls.string(n, x.data(), y.data(), "•");
    }
    if (!lo.empty()) {
      bool finite = true;
      for (int i = 0; i < n; ++i) finite = finite && std::isfinite(lo[i]) && std::isfinite(hi[i]);
      if (finite && (s.style == Style::kLine || s.style == Style::kDashedLine)) {
        // A spread along a curve: thin dashed lines at ±err.
        pls.width(1.0);
        pls.lsty(2);
        pls.line(n, x.data(), lo.data());
        pls.line(n, x.data(), hi.data());
        pls.lsty(1);
      } else if (finite) {
        pls.width(1.0);
        pls.erry(n, x.data(), lo.data(), hi.data());
      }
    }
  }
  pls.width(1.0);
  DrawLegend(pls, panel, colors);
}

void DrawHeatPanel(plstream& pls, const Panel& panel, double text_scale) {
  const int rows = static_cast<int>(panel.heat.size());
  const int cols = rows > 0 ? static_cast<int>(panel.heat[0].size()) : 0;
  if (rows == 0 || cols == 0) return;
  double zmax = 0;
  for (const auto& row : panel.heat) {
    for (double v : row) {
      if (std::isfinite(v)) zmax = std::max(zmax, std::abs(v));
    }
  }
  if (zmax == 0) zmax = 1;
  // Diverging map: blue (−) → white (0) → red (+), symmetric about 0.
  const PLFLT pos[] = {0.0, 0.5, 1.0}, r[] = {0.13, 1.0, 0.70}, g[] = {0.40, 1.0, 0.09}, b[] = {0.67, 1.0, 0.17};
  pls.scmap1l(true, 3, pos, r, g, b, nullptr);
  pls.adv(0);
  pls.vsta();
  // Cell (row l, column c) is the unit square centred on (c, l): integer ticks label it.
  pls.wind(-0.5, cols - 0.5, -0.5, rows - 0.5);
  for (int l = 0; l < rows; ++l) {
    for (int c = 0; c < cols; ++c) {
      const double v = panel.heat[l][c];
      pls.col1(std::isfinite(v) ? 0.5 + 0.5 * v / zmax : 0.5);
      const PLFLT x[] = {c - 0.5, c + 0.5, c + 0.5, c - 0.5}, y[] = {l - 0.5, l - 0.5, l + 0.5, l + 0.5};
      pls.fill(4, x, y);
    }
  }
  pls.col0(kInk);
  pls.box("bcnt", 1.0, 0, "bcntv", 1.0, 0);
  Labels(pls, panel, text_scale);
  pls.schr(0, cols * rows > 64 ? 0.5 : 0.75);
  for (int l = 0; l < rows; ++l) {
    for (int c = 0; c < cols; ++c) {
      char label[32];
      std::snprintf(label, sizeof label, "%.3g", panel.heat[l][c]);
      pls.ptex(c, l - 0.1, 1, 0, 0.5, label);
    }
  }
  pls.schr(0, text_scale);
}

Status Render(const Figure& figure, const std::string& device, const std::string& path) {
  if (!DeviceAvailable(device.c_str())) {
    return FailedPreconditionError("PLplot has no " + device + " device (install plplot-driver-cairo)");
  }
  // PLplot ends the process when it cannot open its output: open it ourselves first.
  {
    errno = 0;
    std::ofstream probe(path, std::ios::trunc);
    if (!probe) return InvalidArgumentError("cannot write " + path + ": " + std::strerror(errno ? errno : EIO));
  }
  // Colours: the palette, then one cmap0 entry per ramp series.
  std::vector<PLINT> r, g, b;
  for (const auto& c : kPalette) r.push_back(c[0]), g.push_back(c[1]), b.push_back(c[2]);
  std::map<const Series*, int> colors;
  for (const Panel& p : figure.panels) {
    for (const Series& s : p.series) {
      if (s.ramp >= 0) {
        const auto c = RampColor(s.ramp);
        colors[&s] = static_cast<int>(r.size());
        r.push_back(c[0]), g.push_back(c[1]), b.push_back(c[2]);
      } else {
        colors[&s] = s.color;
      }
    }
  }
  plstream pls;
  pls.sdev(device.c_str());
  pls.sfnam(path.c_str());
  pls.spage(0, 0, figure.width, figure.height, 0, 0);
  pls.scmap0(r.data(), g.data(), b.data(), static_cast<PLINT>(r.size()));
  pls.ssub(figure.columns, figure.rows);
  pls.init();
  const double text_scale = figure.columns * figure.rows > 4 ? 0.85 : 1.0;
  pls.schr(0, text_scale);
  for (const Panel& panel : figure.panels) {
    if (!panel.heat.empty()) {
      DrawHeatPanel(pls, panel, text_scale);
    } else {
      DrawSeriesPanel(pls, panel, colors, text_scale);
    }
  }
  return OkStatus();  // the file is complete when pls is destroyed
}

std::string Field(const std::string& s) {
  std::string out;
  for (char c : s) out += (c == '\t' || c == '\n' || c == '\r') ? ' ' : c;
  return out;
}

std::string Number(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

}  // namespace

std::string FigureData(const Figure& figure) {
  std::ostringstream os;
  os << "# " << Field(figure.title) << "\n";
  os << "panel\tseries\ttag\tx\ty\terr\tz\n";
  for (const Panel& p : figure.panels) {
    if (!p.heat.empty()) {
      for (size_t l = 0; l < p.heat.size(); ++l) {
        for (size_t c = 0; c < p.heat[l].size(); ++c) {
          os << Field(p.key) << "\theat\t" << Field(p.heat_row_name) << " " << l << ", " << Field(p.heat_col_name)
             << " " << c << "\t" << c << "\t" << l << "\t\t" << Number(p.heat[l][c]) << "\n";
        }
      }
      continue;
    }
    for (const Series& s : p.series) {
      for (size_t i = 0; i < s.x.size(); ++i) {
        os << Field(p.key) << "\t" << Field(s.label) << "\t" << (i < s.tags.size() ? Field(s.tags[i]) : "")
           << "\t" << Number(s.x[i]) << "\t" << Number(s.y[i]) << "\t" << (s.err.empty() ? "" : Number(s.err[i]))
           << "\t\n";
      }
    }
  }
  return os.str();
}

Status WriteFigure(const Figure& figure, const std::string& dir) {
  const std::string stem = dir + "/" + figure.name;
  {
    errno = 0;
    std::ofstream out(stem + ".tsv", std::ios::trunc);
    out << FigureData(figure);
    out.close();
    if (!out) return InvalidArgumentError("cannot write " + stem + ".tsv: " + std::strerror(errno ? errno : EIO));
  }
  RETURN_IF_ERROR(Render(figure, "pngcairo", stem + ".png"));
  RETURN_IF_ERROR(Render(figure, "svgcairo", stem + ".svg"));
  return OkStatus();
}

}  // namespace sinkscope::report
