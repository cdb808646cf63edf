"""The figures of `conret-analyze` (conret_jax/analysis.py): Figure 3 and Figure 5 of the paper, drawn with matplotlib
from the json-ready results of one or two runs (no pyplot, so no global backend: Figure.savefig renders with Agg).

  plot_localization(runs, path, caption=...)   localization.png: per run a 2-D histogram of IoU before vs after
                                               regression (log colour), and the two marginal histograms of all runs
  plot_score_iou(runs, path, caption=...)      score_iou.png: (a, b) score mean and std by output IoU, (c, d) output
                                               IoU mean and std by input IoU, the counts per bin below
A run is a dict with label, step, num_images, fig3 and fig5 (`analysis.Accumulator.results` and the run's names);
the first run is drawn in blue, a second (the comparison) in orange, the same in both figures.
"""

import textwrap

import numpy as np

COLOURS = ('tab:blue', 'tab:orange')  # run, compared run: the same in both figures
COLOUR_MAPS = ('Blues', 'Oranges')


def _title(runs: list, what: str) -> str:
  return f'{what}\n' + '  vs  '.join(f'{r["label"]}, step {r["step"]}' for r in runs)


def _caption(fig, text: str) -> None:
  """`text` at the bottom left, wrapped to the figure's width as drawn.

  Wrapping at a fixed number of characters cut the caption off at the right edge of the narrower single-run
  localization figure, so the line length is shortened until the drawn text fits within the figure's side margins.
  """
  if not text:
    return
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # measures text as savefig will draw it

  renderer = FigureCanvasAgg(fig).get_renderer()
  artist = fig.text(0.01, 0.01, text, fontsize=8, va='bottom')
  right = 0.99 * fig.bbox.width
  width = len(text)
  while artist.get_window_extent(renderer).x1 > right and width > 1:
    box = artist.get_window_extent(renderer)
    width = max(1, min(width - 1, int(width * (right - box.x0) / box.width)))
    artist.set_text(textwrap.fill(text, width))


def _counts(ax, runs, fig: str, edges: str, key: str, xlabel: str, ylabel: str) -> None:
  for i, run in enumerate(runs):
    ax.stairs(run[fig][key], run[fig][edges], color=COLOURS[i], linewidth=2, label=run['label'])
  if any(max(r[fig][key]) > 0 for r in runs):
    ax.set_yscale('log')
  ax.set(xlim=(0, 1), xlabel=xlabel, ylabel=ylabel)
  ax.legend(fontsize=8)


def plot_localization(runs: list, path: str, *, caption: str = ''):
  """localization.png (Figure 3): per run a 2-D histogram of IoU before vs after regression, and the marginals.

  Returns the matplotlib Figure it saved (tests measure its caption).
  """
  from matplotlib import colors
  from matplotlib.figure import Figure  # no pyplot: no global backend

  n = len(runs)
  fig = Figure(figsize=(5.5 * n + 5.0, 6.5))
  grid = fig.add_gridspec(2, n + 1, left=0.06, right=0.98, bottom=0.2, top=0.84, wspace=0.35, hspace=0.5)
  for i, run in enumerate(runs):
    f3 = run['fig3']
    hist = np.asarray(f3['hist2d'], np.float64).T  # rows: output IoU (y), columns: input IoU (x)
    ax = fig.add_subplot(grid[:, i])
    norm = colors.LogNorm(vmin=1, vmax=max(hist.max(), 1.0))
    cells = ax.pcolormesh(f3['bins'], f3['bins'], np.ma.masked_equal(hist, 0), cmap=COLOUR_MAPS[i], norm=norm)
    fig.colorbar(cells, ax=ax, label='anchors', fraction=0.046, pad=0.03)
    ax.plot([0, 1], [0, 1], '--', color='grey', linewidth=1, label='no change')
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect='equal', xlabel='IoU before regression (anchor)')
    ax.set(ylabel='IoU after regression (box)')
    ax.set_title(f'{run["label"]}, step {run["step"]}\n{f3["num_anchors"]} anchors, {run["num_images"]} images')
    ax.title.set_color(COLOURS[i])
    ax.legend(loc='upper left', fontsize=8)
  for row, (key, when) in enumerate((('count_before', 'before'), ('count_after', 'after'))):
    ax = fig.add_subplot(grid[row, n])
    _counts(ax, runs, 'fig3', 'bins', key, f'IoU {when} regression', 'anchors')
    ax.set_title(f'IoU {when} regression')
  fig.suptitle(_title(runs, 'Localization before and after regression (paper, Figure 3)'))
  _caption(fig, caption)
  fig.savefig(path, dpi=100)
  return fig


def plot_score_iou(runs: list, path: str, *, caption: str = ''):
  """score_iou.png (Figure 5): (a, b) score mean and std by output IoU, (c, d) output IoU mean and std by input IoU,
  and the counts per bin below. Returns the matplotlib Figure it saved."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(12.0, 12.5))
  grid = fig.add_gridspec(3, 2, height_ratios=(3, 3, 2), left=0.07, right=0.98, bottom=0.1, top=0.9, hspace=0.45)
  output, anchor = 'output IoU of the detection', 'input IoU of the anchor'
  panels = (
    (0, 0, 'iou_bins', 'score_mean', '(a) score vs output IoU', output, 'score, mean'),
    (1, 0, 'iou_bins', 'score_std', '(b) score spread vs output IoU', output, 'score, std'),
    (0, 1, 'input_iou_bins', 'output_iou_mean', '(c) output IoU vs input IoU', anchor, 'output IoU, mean'),
    (1, 1, 'input_iou_bins', 'output_iou_std', '(d) output IoU spread vs input IoU', anchor, 'output IoU, std'),
  )
  for row, col, edges, key, title, xlabel, ylabel in panels:
    ax = fig.add_subplot(grid[row, col])
    for i, run in enumerate(runs):
      e = np.asarray(run['fig5'][edges])
      y = np.array([np.nan if v is None else v for v in run['fig5'][key]])
      ax.plot((e[:-1] + e[1:]) / 2, y, 'o-', color=COLOURS[i], markersize=4, label=run['label'])
    if key == 'output_iou_mean':
      ax.plot([0, 1], [0, 1], '--', color='grey', linewidth=1, label='output = input')
    ax.set(xlim=(0, 1), title=title, xlabel=xlabel, ylabel=ylabel)
    if key.endswith('mean'):  # scores and IoUs on their whole range: runs compare at a glance
      ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  _counts(fig.add_subplot(grid[2, 0]), runs, 'fig5', 'iou_bins', 'count', output, 'detections per bin')
  _counts(fig.add_subplot(grid[2, 1]), runs, 'fig5', 'input_iou_bins', 'input_count', anchor, 'anchors per bin')
  fig.suptitle(_title(runs, 'Scores and localization by IoU (paper, Figure 5)'))
  _caption(fig, caption)
  fig.savefig(path, dpi=100)
  return fig
