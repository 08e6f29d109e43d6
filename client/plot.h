// Figures as data, drawn by PLplot (C++ binding, cairo devices): a Figure is a grid of
// panels, each a set of series (lines, points, error bars) or one heat map. The same
// Figure is written as PNG, SVG and a tab-separated data file, so what a figure shows can
// be checked against the store number by number.
#pragma once

#include <string>
#include <vector>

#include "base/status.h"

namespace sinkscope::report {

// Colours of the report (PLplot cmap0 indices). 0 is the white background, 1 black ink.
enum Color : int {
  kInk = 1,
  kBaseline = 2,      // blue
  kVScale = 3,        // orange
  kBackwardOnly = 4,  // green
  kGray = 5,
  kHighlight = 6,     // red: token s
  kGroup0 = 7,        // token groups 0, 1, 2–3, 4–7, 8–15 (Figures 3 and 10)
  kGroup1 = 8,
  kGroup2 = 9,
  kGroup3 = 10,
  kGroup4 = 11,
  kPurple = 12,
  // The attention arms (docs/design/ARMS.md); an arm with V-scale keeps its arm's colour.
  kSinkLogit = 13,
  kSoftmaxPlusOne = 14,
  kGatedOutput = 15,
  kGatedHead = 16,
  kGatedValue = 17,
  kSigmoid = 18,
  kSoftpick = 19,
};

enum class Style { kLine, kPoints, kLinePoints, kDashedLine };

struct Series {
  std::string label;  // legend entry; empty: not in the legend
  Style style = Style::kLine;
  int color = kInk;        // cmap0 index, or (ramp ≥ 0) ignored
  double ramp = -1;        // ≥ 0: a colour from the continuous map at this fraction in [0, 1]
  double symbol_size = 1;  // points: relative size
  std::vector<double> x, y;
  std::vector<double> err;        // optional: ± error bars on y (same length as y)
  std::vector<std::string> tags;  // optional: one per point, written to the data file
};

struct Panel {
  std::string key;  // names the panel in the data file (e.g. "baseline/q")
  std::string title, x_label, y_label;
  bool log_x = false, log_y = false;  // draw log10 of the data (non-positive values are left out)
  bool legend = true;
  bool integer_x = false;  // x ticks on integers (layers, heads)
  bool fixed_y = false;    // y from y_min to y_max (e.g. a fraction in [0, 1])
  double y_min = 0, y_max = 1;
  bool reference_y = false;  // a dashed gray line at y = reference (e.g. a ratio of 1)
  double reference = 1;
  std::vector<Series> series;
  // A heat map instead of series: value[row][col], rows along y. Each cell is labelled.
  std::vector<std::vector<double>> heat;
  std::string heat_row_name, heat_col_name;  // e.g. "layer", "KV head"
};

struct Figure {
  std::string name;   // file stem: name.png, name.svg, name.tsv
  std::string title;  // shown in index.html above the image
  std::string caption;
  int columns = 1, rows = 1;
  int width = 1200, height = 800;  // pixels of the PNG
  std::vector<Panel> panels;
};

// Writes dir/name.png and dir/name.svg (PLplot pngcairo and svgcairo) and dir/name.tsv
// (columns: panel, series, tag, x, y, err, z; one row per point, the data as given; a
// heat map cell has x = column, y = row and its value in z).
Status WriteFigure(const Figure& figure, const std::string& dir);

// The tab-separated data of a figure, as WriteFigure writes it.
std::string FigureData(const Figure& figure);

}  // namespace sinkscope::report
