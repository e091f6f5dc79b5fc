//! Report: what a run leaves behind and what it prints.
//!
//! A run directory holds the history (`history.jsonl`, one [`Record`] a
//! line), the verdict (written by the caller), and two SVG plots:
//!
//! * `latency.svg`: every operation as a point, x = when it completed
//!   (seconds since the run started), y = its latency (ms, log scale),
//!   coloured by outcome (ok green, fail red, info orange), circles for
//!   FINDs and triangles for writes; operations still pending at the end are
//!   drawn as info at the end of the run.
//! * `throughput.svg`: completions per second, one line per outcome.
//! * `terms.svg`: each master's Raft term from its metrics, with the
//!   moments it led and those it did not answer.
//!
//! All three shade the nemesis intervals (a fault's `start` paired with its next
//! `stop`; a start never stopped lasts to the end) with one translucent
//! colour per fault kind, named in the legend. [`summary`] is the compact
//! text printed at the end of a run.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::history::{Event, EventType, NemesisEvent, Op, Record};
use crate::monitor::Sample;

/// The history file's name inside a run directory.
pub const HISTORY_FILE: &str = "history.jsonl";

/// At most this many points in the latency scatter: beyond it, `ok` points
/// are sampled (the slowest are kept); `fail` and `info` points never are.
pub const MAX_SCATTER_POINTS: usize = 20_000;

/// Latencies below this (ms) are drawn at it: the log scale needs a floor.
pub const MIN_LATENCY_MS: f64 = 0.05;

/// Writes `records` to `dir/history.jsonl`, one JSON object a line, creating
/// `dir` if needed.
pub fn write_history(dir: &Path, records: &[Record]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    write_jsonl(&dir.join(HISTORY_FILE), records)
}

/// Writes `items` to `path`, one JSON object a line.
pub fn write_jsonl<T: serde::Serialize>(path: &Path, items: &[T]) -> io::Result<()> {
    let mut out = BufWriter::new(File::create(path)?);
    for item in items {
        serde_json::to_writer(&mut out, item)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads a history written by [`write_history`]. Blank lines are skipped; a
/// line that is not a record is an `InvalidData` error naming the line.
pub fn read_history(path: &Path) -> io::Result<Vec<Record>> {
    let reader = BufReader::new(File::open(path)?);
    let mut records = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}:{}: {e}", path.display(), n + 1),
            )
        })?;
        records.push(record);
    }
    Ok(records)
}

/// Splits a history into its client events and its nemesis events, each in
/// the history's order.
pub fn split_records(records: &[Record]) -> (Vec<Event>, Vec<NemesisEvent>) {
    let mut events = Vec::new();
    let mut nemesis = Vec::new();
    for record in records {
        match record {
            Record::Client(e) => events.push(e.clone()),
            Record::Nemesis(e) => nemesis.push(e.clone()),
        }
    }
    (events, nemesis)
}

// ---------------------------------------------------------------------------
// Analysis shared by the plots and the summary.

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Outcome {
    Ok,
    Fail,
    Info,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Ok, Outcome::Fail, Outcome::Info];

    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
            Outcome::Info => "info",
        }
    }

    fn colour(self) -> RGBColor {
        match self {
            Outcome::Ok => RGBColor(44, 160, 44),
            Outcome::Fail => RGBColor(214, 39, 40),
            Outcome::Info => RGBColor(255, 127, 14),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// An invocation paired with its completion.
#[derive(Debug, Clone)]
struct Operation<'a> {
    invoke_ns: u64,
    /// For a pending operation: the end of the run.
    complete_ns: u64,
    op: &'a Op,
    outcome: Outcome,
    /// No completion was recorded (drawn and counted as info).
    pending: bool,
}

impl Operation<'_> {
    fn latency_ms(&self) -> f64 {
        self.complete_ns.saturating_sub(self.invoke_ns) as f64 / 1e6
    }
}

/// A fault's interval.
#[derive(Debug, Clone, PartialEq)]
struct Interval {
    fault: String,
    start_ns: u64,
    end_ns: u64,
}

/// The operation names, in the order the summary lists them.
const OP_KINDS: [&str; 5] = ["reserve", "activate", "deactivate", "delete", "find"];

fn op_kind(op: &Op) -> &'static str {
    match op {
        Op::Reserve { .. } => "reserve",
        Op::Activate { .. } => "activate",
        Op::Deactivate { .. } => "deactivate",
        Op::Delete => "delete",
        Op::Find => "find",
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The last timestamp of the run (client or nemesis).
fn run_end_ns(events: &[Event], nemesis: &[NemesisEvent]) -> u64 {
    let e = events.iter().map(|e| e.time_ns).max().unwrap_or(0);
    let n = nemesis.iter().map(|e| e.time_ns).max().unwrap_or(0);
    e.max(n)
}

/// Pairs each invocation with the next completion of the same process (a
/// process has one operation in flight at a time). Completions without an
/// invocation are ignored; invocations without a completion are returned as
/// pending info operations ending at `end_ns`.
fn pair_operations(events: &[Event], end_ns: u64) -> Vec<Operation<'_>> {
    let mut order: Vec<&Event> = events.iter().collect();
    order.sort_by_key(|e| e.time_ns); // stable: ties keep the history's order
    let mut open: HashMap<u64, &Event> = HashMap::new();
    let mut ops = Vec::with_capacity(events.len() / 2 + 1);
    let mut pending = Vec::new();
    for e in order {
        let outcome = match e.kind {
            EventType::Invoke => {
                if let Some(previous) = open.insert(e.process, e) {
                    pending.push(previous);
                }
                continue;
            }
            EventType::Ok => Outcome::Ok,
            EventType::Fail => Outcome::Fail,
            EventType::Info => Outcome::Info,
        };
        if let Some(invoke) = open.remove(&e.process) {
            ops.push(Operation {
                invoke_ns: invoke.time_ns,
                complete_ns: e.time_ns,
                op: &invoke.op,
                outcome,
                pending: false,
            });
        }
    }
    pending.extend(open.into_values());
    pending.sort_by_key(|e| (e.time_ns, e.process));
    ops.extend(pending.into_iter().map(|invoke| Operation {
        invoke_ns: invoke.time_ns,
        complete_ns: end_ns.max(invoke.time_ns),
        op: &invoke.op,
        outcome: Outcome::Info,
        pending: true,
    }));
    ops
}

/// Pairs each fault's `start` with its next `stop` (first started, first
/// stopped); a start never stopped lasts to `end_ns`, a stop without a start
/// is ignored. Sorted by start time.
fn fault_intervals(nemesis: &[NemesisEvent], end_ns: u64) -> Vec<Interval> {
    let mut order: Vec<&NemesisEvent> = nemesis.iter().collect();
    order.sort_by_key(|e| e.time_ns);
    let mut open: BTreeMap<&str, VecDeque<u64>> = BTreeMap::new();
    let mut intervals = Vec::new();
    for e in order {
        match e.phase.as_str() {
            "start" => open.entry(&e.fault).or_default().push_back(e.time_ns),
            "stop" => {
                if let Some(start) = open.get_mut(e.fault.as_str()).and_then(|q| q.pop_front()) {
                    intervals.push(Interval {
                        fault: e.fault.clone(),
                        start_ns: start,
                        end_ns: e.time_ns.max(start),
                    });
                }
            }
            _ => {}
        }
    }
    for (fault, starts) in open {
        for start in starts {
            intervals.push(Interval {
                fault: fault.to_owned(),
                start_ns: start,
                end_ns: end_ns.max(start),
            });
        }
    }
    intervals.sort_by(|a, b| (a.start_ns, &a.fault).cmp(&(b.start_ns, &b.fault)));
    intervals
}

/// Translucent band colours for fault kinds, away from the outcome colours.
const FAULT_PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),  // blue
    RGBColor(148, 103, 189), // purple
    RGBColor(140, 86, 75),   // brown
    RGBColor(227, 119, 194), // pink
    RGBColor(127, 127, 127), // grey
    RGBColor(188, 189, 34),  // olive
    RGBColor(23, 190, 207),  // cyan
    RGBColor(0, 0, 128),     // navy
];

/// Opacity of the nemesis bands.
const BAND_ALPHA: f64 = 0.15;

/// The fault kinds present, sorted by name, with their colours.
fn fault_colours(intervals: &[Interval]) -> BTreeMap<&str, RGBColor> {
    let mut colours: BTreeMap<&str, RGBColor> = intervals
        .iter()
        .map(|i| (i.fault.as_str(), BLACK))
        .collect();
    for (n, colour) in colours.values_mut().enumerate() {
        *colour = FAULT_PALETTE[n % FAULT_PALETTE.len()];
    }
    colours
}

/// Nearest-rank percentile of sorted values.
/// Shades each fault interval on a chart whose y axis is linear up to
/// `y_max`.
fn draw_fault_bands<DB>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    intervals: &[Interval],
    colours: &BTreeMap<&str, RGBColor>,
    y_max: f64,
) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    for iv in intervals {
        let colour = colours[iv.fault.as_str()];
        chart.draw_series(std::iter::once(Rectangle::new(
            [(secs(iv.start_ns), 0.0), (secs(iv.end_ns), y_max)],
            colour.mix(BAND_ALPHA).filled(),
        )))?;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

// ---------------------------------------------------------------------------
// Plots.

const WIDTH: u32 = 1400;
const HEIGHT: u32 = 700;
/// Width of the legend panel on the right.
const LEGEND_WIDTH: u32 = 230;

/// One entry of the legend panel.
enum LegendMark {
    Circle(RGBColor),
    Triangle(RGBColor),
    Line(RGBColor),
    Band(RGBColor),
}

/// Draws the legend as a column of marks and labels.
fn draw_legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    entries: &[(LegendMark, String)],
) -> anyhow::Result<()> {
    let font =
        TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let mut y = 50;
    for (mark, label) in entries {
        let at = (16, y);
        match mark {
            LegendMark::Circle(c) => area.draw(&Circle::new(at, 4, c.filled()))?,
            LegendMark::Triangle(c) => area.draw(&TriangleMarker::new(at, 5, c.filled()))?,
            LegendMark::Line(c) => {
                area.draw(&PathElement::new(vec![(6, y), (26, y)], c.stroke_width(2)))?
            }
            LegendMark::Band(c) => area.draw(&Rectangle::new(
                [(6, y - 7), (26, y + 7)],
                c.mix(BAND_ALPHA * 2.0).filled(),
            ))?,
        }
        area.draw(&Text::new(label.clone(), (34, y), font.clone()))?;
        y += 22;
    }
    Ok(())
}

/// Legend entries for the fault kinds.
fn band_legend(colours: &BTreeMap<&str, RGBColor>) -> Vec<(LegendMark, String)> {
    colours
        .iter()
        .map(|(fault, c)| (LegendMark::Band(*c), format!("nemesis: {fault}")))
        .collect()
}

/// A point of the latency scatter.
#[derive(Debug, Clone, Copy)]
struct Point {
    x: f64,
    latency_ms: f64,
    outcome: Outcome,
    find: bool,
}

/// Keeps every `fail` and `info` point and at most `cap` points in all if
/// they fit: the budget left goes to the slowest tenth of the `ok` points
/// it can hold, then to an even sample of the others. Returns the points
/// kept and how many `ok` points were dropped.
fn downsample(points: Vec<Point>, cap: usize) -> (Vec<Point>, usize) {
    if points.len() <= cap {
        return (points, 0);
    }
    let n_ok = points.iter().filter(|p| p.outcome == Outcome::Ok).count();
    let budget = cap.saturating_sub(points.len() - n_ok);
    let slow_budget = budget / 10;
    let mut latencies: Vec<f64> = points
        .iter()
        .filter(|p| p.outcome == Outcome::Ok)
        .map(|p| p.latency_ms)
        .collect();
    latencies.sort_by(|a, b| b.total_cmp(a));
    let threshold = match slow_budget {
        0 => f64::INFINITY,
        n => latencies[n - 1],
    };
    let mut keep = vec![false; points.len()];
    let mut slow_kept = 0;
    for (k, p) in points.iter().enumerate() {
        if p.outcome != Outcome::Ok {
            keep[k] = true;
        } else if p.latency_ms >= threshold && slow_kept < slow_budget {
            keep[k] = true;
            slow_kept += 1;
        }
    }
    let rest = n_ok - slow_kept;
    let rest_budget = budget - slow_kept;
    // Keep the i-th of the others when (i + 1) * rest_budget / rest steps
    // up: exactly min(rest, rest_budget) of them, evenly spread.
    let mut i = 0;
    for (k, p) in points.iter().enumerate() {
        if p.outcome == Outcome::Ok && !keep[k] {
            keep[k] = (i + 1) * rest_budget / rest > i * rest_budget / rest;
            i += 1;
        }
    }
    let kept: Vec<Point> = points
        .into_iter()
        .zip(keep)
        .filter_map(|(p, k)| k.then_some(p))
        .collect();
    let kept_ok = kept.iter().filter(|p| p.outcome == Outcome::Ok).count();
    (kept, n_ok - kept_ok)
}

/// Formats an axis value in ms without useless digits.
fn format_ms(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// Renders the latency scatter to `path` (SVG): x = completion time in
/// seconds since the run started, y = latency in ms on a log scale (floored
/// at [`MIN_LATENCY_MS`]). Colour is the outcome (ok green, fail red, info
/// orange), shape the kind (circle FIND, triangle write). Invocations never
/// completed are drawn as info at the end of the run, at the latency they
/// had reached. Nemesis intervals are shaded, one colour per fault kind. At
/// most [`MAX_SCATTER_POINTS`] points are drawn unless there are more
/// fail/info points than that: only ok points are sampled.
pub fn plot_latency(path: &Path, events: &[Event], nemesis: &[NemesisEvent]) -> anyhow::Result<()> {
    let end_ns = run_end_ns(events, nemesis);
    let ops = pair_operations(events, end_ns);
    let intervals = fault_intervals(nemesis, end_ns);
    let colours = fault_colours(&intervals);

    let points: Vec<Point> = ops
        .iter()
        .map(|o| Point {
            x: secs(o.complete_ns),
            latency_ms: o.latency_ms().max(MIN_LATENCY_MS),
            outcome: o.outcome,
            find: matches!(o.op, Op::Find),
        })
        .collect();
    let total = points.len();
    let (points, dropped) = downsample(points, MAX_SCATTER_POINTS);
    let pending = ops.iter().filter(|o| o.pending).count();

    // A little room on the right for the points of pending operations.
    let x_max = secs(end_ns).max(1e-3) * 1.01;
    let y_max = points.iter().map(|p| p.latency_ms).fold(1.0_f64, f64::max) * 2.0;

    let mut caption = format!("Latency of {total} operations");
    if pending > 0 {
        let _ = write!(caption, " ({pending} pending at the end)");
    }
    if dropped > 0 {
        let _ = write!(caption, ", {dropped} ok points sampled out");
    }

    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot_area, legend_area) = root.split_horizontally(WIDTH - LEGEND_WIDTH);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0f64..x_max, (MIN_LATENCY_MS..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("completion time (s since start)")
        .y_desc("latency (ms, log scale)")
        .y_label_formatter(&|v| format_ms(*v))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;

    for iv in &intervals {
        let colour = colours[iv.fault.as_str()];
        chart.draw_series(std::iter::once(Rectangle::new(
            [
                (secs(iv.start_ns), MIN_LATENCY_MS),
                (secs(iv.end_ns), y_max),
            ],
            colour.mix(BAND_ALPHA).filled(),
        )))?;
    }

    let mut legend = Vec::new();
    // ok first so that fail and info are drawn on top.
    for outcome in Outcome::ALL {
        for find in [true, false] {
            let series: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.outcome == outcome && p.find == find)
                .map(|p| (p.x, p.latency_ms))
                .collect();
            if series.is_empty() {
                continue;
            }
            let alpha = if outcome == Outcome::Ok { 0.45 } else { 0.85 };
            let style = outcome.colour().mix(alpha).filled();
            let label = format!(
                "{} {} ({})",
                if find { "find" } else { "write" },
                outcome.name(),
                series.len()
            );
            if find {
                chart.draw_series(series.into_iter().map(|p| Circle::new(p, 2, style)))?;
                legend.push((LegendMark::Circle(outcome.colour()), label));
            } else {
                chart.draw_series(series.into_iter().map(|p| TriangleMarker::new(p, 3, style)))?;
                legend.push((LegendMark::Triangle(outcome.colour()), label));
            }
        }
    }
    legend.extend(band_legend(&colours));
    draw_legend(&legend_area, &legend)?;
    root.present()?;
    Ok(())
}

/// Renders completions per second to `path` (SVG), one step line per
/// outcome (ok, fail, info), over one-second buckets (shorter for a run
/// under 20 s, still scaled to per second), with the nemesis intervals
/// shaded as in [`plot_latency`]. Invocations never completed are not
/// completions and are not counted.
pub fn plot_throughput(
    path: &Path,
    events: &[Event],
    nemesis: &[NemesisEvent],
) -> anyhow::Result<()> {
    let end_ns = run_end_ns(events, nemesis);
    let ops = pair_operations(events, end_ns);
    let intervals = fault_intervals(nemesis, end_ns);
    let colours = fault_colours(&intervals);

    let duration = secs(end_ns).max(1e-3);
    let width = if duration >= 20.0 {
        1.0
    } else {
        (duration / 20.0).max(1e-3)
    };
    let buckets = ((duration / width).ceil() as usize).max(1);
    let mut counts = vec![[0u64; 3]; buckets];
    for o in ops.iter().filter(|o| !o.pending) {
        let b = ((secs(o.complete_ns) / width) as usize).min(buckets - 1);
        counts[b][o.outcome.index()] += 1;
    }
    let x_max = buckets as f64 * width;
    let y_max = counts
        .iter()
        .flat_map(|c| c.iter())
        .map(|&n| n as f64 / width)
        .fold(1.0_f64, f64::max)
        * 1.1;

    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot_area, legend_area) = root.split_horizontally(WIDTH - LEGEND_WIDTH);
    let caption = if width == 1.0 {
        "Completions per second".to_owned()
    } else {
        format!("Completions per second ({:.0} ms buckets)", width * 1e3)
    };
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("time (s since start)")
        .y_desc("completions / s")
        .y_label_formatter(&|v| {
            if y_max >= 10.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;

    draw_fault_bands(&mut chart, &intervals, &colours, y_max)?;

    let mut legend = Vec::new();
    for outcome in Outcome::ALL {
        let total: u64 = counts.iter().map(|c| c[outcome.index()]).sum();
        if total == 0 && outcome != Outcome::Ok {
            continue;
        }
        let mut line = Vec::with_capacity(buckets * 2);
        for (b, c) in counts.iter().enumerate() {
            let rate = c[outcome.index()] as f64 / width;
            line.push((b as f64 * width, rate));
            line.push(((b + 1) as f64 * width, rate));
        }
        chart.draw_series(LineSeries::new(line, outcome.colour().stroke_width(2)))?;
        legend.push((
            LegendMark::Line(outcome.colour()),
            format!("{} ({total})", outcome.name()),
        ));
    }
    legend.extend(band_legend(&colours));
    draw_legend(&legend_area, &legend)?;
    root.present()?;
    Ok(())
}

/// Renders what the masters' metrics said over the run to `path` (SVG):
/// each master's Raft term as a line (x = seconds since the run started),
/// a filled dot where it said it led, a cross where it did not answer (down
/// or paused), with the nemesis intervals shaded as in [`plot_latency`].
pub fn plot_terms(path: &Path, samples: &[Sample], nemesis: &[NemesisEvent]) -> anyhow::Result<()> {
    let end_ns = samples
        .iter()
        .map(|s| s.time_ns)
        .chain(nemesis.iter().map(|e| e.time_ns))
        .max()
        .unwrap_or(0);
    let intervals = fault_intervals(nemesis, end_ns);
    let colours = fault_colours(&intervals);
    let x_max = secs(end_ns).max(1e-3) * 1.01;
    let t_max = samples.iter().filter_map(|s| s.term).max().unwrap_or(1) as f64;
    let y_max = t_max * 1.1 + 1.0;
    let mut nodes: Vec<&str> = samples.iter().map(|s| s.node.as_str()).collect();
    nodes.sort();
    nodes.dedup();

    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot_area, legend_area) = root.split_horizontally(WIDTH - LEGEND_WIDTH);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(
            "Raft term per master (dot: leader, cross: no answer)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("time (s since start)")
        .y_desc("term")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    draw_fault_bands(&mut chart, &intervals, &colours, y_max)?;
    let mut legend = Vec::new();
    for (k, node) in nodes.iter().enumerate() {
        let colour = NODE_PALETTE[k % NODE_PALETTE.len()];
        // Nodes drawn a little apart so that equal terms stay visible.
        let offset = k as f64 * 0.04;
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.node == *node).collect();
        let line: Vec<(f64, f64)> = mine
            .iter()
            .filter_map(|s| s.term.map(|t| (secs(s.time_ns), t as f64 + offset)))
            .collect();
        chart.draw_series(LineSeries::new(line, colour.stroke_width(2)))?;
        chart.draw_series(
            mine.iter()
                .filter(|s| s.is_leader == Some(true))
                .filter_map(|s| s.term.map(|t| (secs(s.time_ns), t as f64 + offset)))
                .map(|p| Circle::new(p, 3, colour.filled())),
        )?;
        let mut last_term = 0.0;
        let mut downs = Vec::new();
        for s in &mine {
            match s.term {
                Some(t) if s.up => last_term = t as f64,
                _ => downs.push((secs(s.time_ns), last_term + offset)),
            }
        }
        chart.draw_series(
            downs
                .into_iter()
                .map(|p| Cross::new(p, 3, colour.stroke_width(1))),
        )?;
        legend.push((LegendMark::Line(colour), (*node).to_owned()));
    }
    legend.extend(band_legend(&colours));
    draw_legend(&legend_area, &legend)?;
    root.present()?;
    Ok(())
}

/// Line colours for the masters in [`plot_terms`].
const NODE_PALETTE: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

// ---------------------------------------------------------------------------
// Terminal summary.

/// A compact multi-line summary for the terminal: the run's duration and
/// rate, a table of operations by kind and outcome (invocations never
/// completed count as info and are noted), the p50/p99/max latency of `ok`
/// operations, the faults injected (starts per kind) and the verdict line,
/// `VALID` or `INVALID: N anomalies`.
pub fn summary(
    events: &[Event],
    nemesis: &[NemesisEvent],
    verdict_valid: bool,
    anomalies: usize,
) -> String {
    let end_ns = run_end_ns(events, nemesis);
    let ops = pair_operations(events, end_ns);
    let duration = secs(end_ns);
    let pending = ops.iter().filter(|o| o.pending).count();

    let mut table: BTreeMap<&str, [usize; 3]> = BTreeMap::new();
    for o in &ops {
        table.entry(op_kind(o.op)).or_default()[o.outcome.index()] += 1;
    }
    let mut totals = [0usize; 3];
    for row in table.values() {
        for (t, n) in totals.iter_mut().zip(row) {
            *t += n;
        }
    }

    let mut out = String::new();
    let rate = if duration > 0.0 {
        ops.len() as f64 / duration
    } else {
        0.0
    };
    let _ = write!(
        out,
        "duration {duration:.1} s, {} operations ({rate:.0}/s)",
        ops.len()
    );
    if pending > 0 {
        let _ = write!(out, ", {pending} never completed (counted as info)");
    }
    out.push('\n');
    let _ = writeln!(out, "  {:<12}{:>9}{:>9}{:>9}", "op", "ok", "fail", "info");
    for kind in OP_KINDS {
        if let Some(row) = table.get(kind) {
            let _ = writeln!(out, "  {kind:<12}{:>9}{:>9}{:>9}", row[0], row[1], row[2]);
        }
    }
    let _ = writeln!(
        out,
        "  {:<12}{:>9}{:>9}{:>9}",
        "all", totals[0], totals[1], totals[2]
    );

    let mut latencies: Vec<f64> = ops
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .map(|o| o.latency_ms())
        .collect();
    latencies.sort_by(f64::total_cmp);
    match (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last(),
    ) {
        (Some(p50), Some(p99), Some(max)) => {
            let _ = writeln!(
                out,
                "ok latency: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
            );
        }
        _ => out.push_str("ok latency: no ok operations\n"),
    }

    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    for e in nemesis.iter().filter(|e| e.phase == "start") {
        *faults.entry(&e.fault).or_default() += 1;
    }
    if faults.is_empty() {
        out.push_str("faults: none\n");
    } else {
        let list: Vec<String> = faults.iter().map(|(f, n)| format!("{f} x{n}")).collect();
        let _ = writeln!(
            out,
            "faults: {} ({} in all)",
            list.join(", "),
            faults.values().sum::<usize>()
        );
    }

    if verdict_valid {
        out.push_str("verdict: VALID");
    } else {
        let _ = write!(
            out,
            "verdict: INVALID: {anomalies} anomal{}",
            if anomalies == 1 { "y" } else { "ies" }
        );
        if anomalies == 0 {
            out.push_str(" (some histories could not be checked)");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Entry, Value};

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn event(time_ns: u64, process: u64, kind: EventType, op: Op) -> Event {
        let (value, error) = match kind {
            EventType::Ok => (
                Some(match op {
                    Op::Find => Value::Found {
                        entry: Some(Entry {
                            location: "n1!default".into(),
                            acl: "anyone lrs".into(),
                            active: true,
                        }),
                    },
                    _ => Value::Done,
                }),
                None,
            ),
            EventType::Fail => (None, Some("connection refused".into())),
            EventType::Info => (None, Some("timeout".into())),
            EventType::Invoke => (None, None),
        };
        Event {
            time_ns,
            process,
            kind,
            mailbox: format!("user.m{}", process % 7),
            node: format!("n{}", process % 3 + 1),
            op,
            value,
            error,
        }
    }

    fn nem(time_s: f64, phase: &str, fault: &str) -> NemesisEvent {
        NemesisEvent {
            time_ns: (time_s * 1e9) as u64,
            phase: phase.into(),
            fault: fault.into(),
            detail: format!("{phase} {fault}"),
            ..NemesisEvent::default()
        }
    }

    /// Expected counts of a synthetic history.
    #[derive(Default, Debug)]
    struct Counts {
        ok: usize,
        fail: usize,
        info: usize,
        pending: usize,
        finds: usize,
    }

    /// `n` operations over 8 processes across about 30 s, with fails and
    /// infos inside the fault windows and two pending invocations at the
    /// end; a partition from 5 s to 10 s and a kill from 20 s never stopped.
    fn synthetic(n: usize) -> (Vec<Event>, Vec<NemesisEvent>, Counts) {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let processes = 8u64;
        let mut clock = vec![0u64; processes as usize];
        let mut events = Vec::new();
        let mut counts = Counts::default();
        let step = 30_000_000_000 / (n as u64 / processes).max(1);
        for i in 0..n {
            let p = (i as u64) % processes;
            let t0 = clock[p as usize] + rng.below(step / 2);
            let op = match rng.below(6) {
                0 => Op::Reserve {
                    location: "n1!default".into(),
                },
                1 => Op::Activate {
                    location: "n1!default".into(),
                    acl: "anyone lrs".into(),
                },
                2 => Op::Deactivate {
                    location: "n1!default".into(),
                },
                3 => Op::Delete,
                _ => Op::Find,
            };
            if matches!(op, Op::Find) {
                counts.finds += 1;
            }
            events.push(event(t0, p, EventType::Invoke, op.clone()));
            let in_fault = (5.0..10.0).contains(&secs(t0)) || secs(t0) >= 20.0;
            let roll = rng.below(100);
            let (kind, latency) = if in_fault && roll < 10 {
                counts.fail += 1;
                (EventType::Fail, 20_000 + rng.below(200_000))
            } else if in_fault && roll < 20 {
                counts.info += 1;
                (EventType::Info, 1_000_000_000)
            } else {
                counts.ok += 1;
                // Mostly ~0.3 ms, a few slow ones.
                let slow = rng.below(100) == 0;
                let base = if slow { 50_000_000 } else { 300_000 };
                (EventType::Ok, base + rng.below(base))
            };
            events.push(event(t0 + latency, p, kind, op));
            clock[p as usize] = t0 + latency + 1;
        }
        // Two invocations that never complete.
        let last = events.iter().map(|e| e.time_ns).max().unwrap();
        for p in [processes, processes + 1] {
            events.push(event(last - 1_000_000, p, EventType::Invoke, Op::Delete));
            counts.pending += 1;
        }
        events.sort_by_key(|e| e.time_ns);
        let nemesis = vec![
            nem(5.0, "start", "partition-halves"),
            nem(10.0, "stop", "partition-halves"),
            nem(20.0, "start", "kill"),
        ];
        (events, nemesis, counts)
    }

    #[test]
    fn history_round_trips() {
        let (events, nemesis, _) = synthetic(500);
        let mut records: Vec<Record> = events.iter().cloned().map(Record::Client).collect();
        records.extend(nemesis.iter().cloned().map(Record::Nemesis));
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run-1");
        write_history(&run, &records).unwrap();
        let path = run.join(HISTORY_FILE);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), records.len());
        assert!(text.lines().all(|l| l.starts_with('{') && l.ends_with('}')));
        let back = read_history(&path).unwrap();
        assert_eq!(back, records);
        let (e, n) = split_records(&back);
        assert_eq!(e, events);
        assert_eq!(n, nemesis);
    }

    #[test]
    fn read_history_names_a_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HISTORY_FILE);
        let good = serde_json::to_string(&Record::Nemesis(nem(1.0, "start", "kill"))).unwrap();
        fs::write(&path, format!("{good}\n\n{{\"nonsense\": 1}}\n")).unwrap();
        let err = read_history(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(":3:"), "{err}");
    }

    #[test]
    fn pairs_operations_and_keeps_pending_ones() {
        let (events, nemesis, counts) = synthetic(1000);
        let end = run_end_ns(&events, &nemesis);
        let ops = pair_operations(&events, end);
        assert_eq!(ops.len(), 1000 + counts.pending);
        let pending: Vec<_> = ops.iter().filter(|o| o.pending).collect();
        assert_eq!(pending.len(), 2);
        assert!(pending
            .iter()
            .all(|o| o.outcome == Outcome::Info && o.complete_ns == end));
        let n = |k| ops.iter().filter(|o| !o.pending && o.outcome == k).count();
        assert_eq!(
            (n(Outcome::Ok), n(Outcome::Fail), n(Outcome::Info)),
            (counts.ok, counts.fail, counts.info)
        );
        assert!(ops.iter().all(|o| o.complete_ns >= o.invoke_ns));
    }

    #[test]
    fn fault_intervals_pair_starts_and_stops() {
        let nemesis = vec![
            nem(1.0, "start", "kill"),
            nem(2.0, "start", "kill"),
            nem(3.0, "start", "partition-ring"),
            nem(4.0, "stop", "kill"),
            nem(5.0, "stop", "pause"), // no start: ignored
            nem(6.0, "stop", "kill"),
            nem(7.0, "stop", "partition-ring"),
            nem(8.0, "start", "pause"), // never stopped
        ];
        let got: Vec<(String, f64, f64)> = fault_intervals(&nemesis, 10_000_000_000)
            .into_iter()
            .map(|i| (i.fault, secs(i.start_ns), secs(i.end_ns)))
            .collect();
        assert_eq!(
            got,
            vec![
                ("kill".into(), 1.0, 4.0),
                ("kill".into(), 2.0, 6.0),
                ("partition-ring".into(), 3.0, 7.0),
                ("pause".into(), 8.0, 10.0),
            ]
        );
    }

    #[test]
    fn plots_render_with_bands_and_legend() {
        let (events, nemesis, _) = synthetic(3000);
        let dir = tempfile::tempdir().unwrap();
        let latency = dir.path().join("latency.svg");
        let throughput = dir.path().join("throughput.svg");
        plot_latency(&latency, &events, &nemesis).unwrap();
        plot_throughput(&throughput, &events, &nemesis).unwrap();
        for path in [&latency, &throughput] {
            let svg = fs::read_to_string(path).unwrap();
            assert!(
                svg.len() > 10_000,
                "{} is {} bytes",
                path.display(),
                svg.len()
            );
            assert!(svg.contains("<svg"));
            assert!(
                svg.contains("nemesis: partition-halves"),
                "{}",
                path.display()
            );
            assert!(svg.contains("nemesis: kill"), "{}", path.display());
            assert!(svg.contains("<text"));
        }
        let svg = fs::read_to_string(&latency).unwrap();
        assert!(svg.contains("latency (ms, log scale)"));
        assert!(svg.contains("find ok") && svg.contains("write fail") && svg.contains("info"));
        // One circle per FIND (plus the legend's), nothing sampled out.
        assert!(!svg.contains("sampled out"));
        assert!(svg.matches("<circle").count() > 500);
        let svg = fs::read_to_string(&throughput).unwrap();
        assert!(svg.contains("completions / s"));
        assert!(svg.contains("<polyline") || svg.contains("<path"));
    }

    #[test]
    fn plots_of_an_empty_run_render() {
        let dir = tempfile::tempdir().unwrap();
        let latency = dir.path().join("latency.svg");
        let throughput = dir.path().join("throughput.svg");
        plot_latency(&latency, &[], &[]).unwrap();
        plot_throughput(&throughput, &[], &[]).unwrap();
        assert!(fs::read_to_string(&latency).unwrap().contains("<svg"));
        assert!(fs::read_to_string(&throughput).unwrap().contains("<svg"));
    }

    #[test]
    fn downsampling_keeps_every_fail_and_info_and_the_slowest() {
        let mut rng = Rng(7);
        let points: Vec<Point> = (0..120_000)
            .map(|i| Point {
                x: i as f64 / 1000.0,
                latency_ms: if i == 77_777 {
                    10_000.0
                } else {
                    0.1 + rng.below(1000) as f64 / 1000.0
                },
                outcome: match i % 100 {
                    0 => Outcome::Fail,
                    1 => Outcome::Info,
                    _ => Outcome::Ok,
                },
                find: i % 2 == 0,
            })
            .collect();
        let (kept, dropped) = downsample(points, MAX_SCATTER_POINTS);
        assert!(kept.len() <= MAX_SCATTER_POINTS, "{}", kept.len());
        assert!(kept.len() > MAX_SCATTER_POINTS * 9 / 10, "{}", kept.len());
        assert_eq!(
            kept.iter().filter(|p| p.outcome == Outcome::Fail).count(),
            1200
        );
        assert_eq!(
            kept.iter().filter(|p| p.outcome == Outcome::Info).count(),
            1200
        );
        let kept_ok = kept.iter().filter(|p| p.outcome == Outcome::Ok).count();
        assert_eq!(kept_ok + dropped, 120_000 - 2400);
        assert!(kept.iter().any(|p| p.latency_ms == 10_000.0));
        // Spread over the whole run, not just its beginning.
        assert!(kept.iter().any(|p| p.x > 110.0));

        // Under the cap nothing is dropped.
        let few: Vec<Point> = kept.iter().copied().take(100).collect();
        assert_eq!(downsample(few, MAX_SCATTER_POINTS).0.len(), 100);
    }

    #[test]
    fn big_history_renders_bounded() {
        let (events, nemesis, _) = synthetic(100_000);
        let dir = tempfile::tempdir().unwrap();
        let latency = dir.path().join("latency.svg");
        plot_latency(&latency, &events, &nemesis).unwrap();
        let svg = fs::read_to_string(&latency).unwrap();
        let marks = svg.matches("<circle").count() + svg.matches("<polygon").count();
        assert!(marks <= MAX_SCATTER_POINTS + 100, "{marks} marks");
        assert!(svg.contains("sampled out"));
        plot_throughput(&dir.path().join("throughput.svg"), &events, &nemesis).unwrap();
    }

    #[test]
    fn summary_counts_everything() {
        let (events, nemesis, counts) = synthetic(3000);
        let s = summary(&events, &nemesis, true, 0);
        let all = format!(
            "{:<12}{:>9}{:>9}{:>9}",
            "all",
            counts.ok,
            counts.fail,
            counts.info + counts.pending
        );
        assert!(s.contains(&all), "{s}");
        assert!(s.contains("2 never completed"), "{s}");
        assert!(s.contains("duration "), "{s}");
        assert!(s.contains("ok latency: p50 "), "{s}");
        assert!(
            s.contains("faults: kill x1, partition-halves x1 (2 in all)"),
            "{s}"
        );
        assert!(s.ends_with("verdict: VALID"), "{s}");
        let finds: usize = s
            .lines()
            .find(|l| l.trim_start().starts_with("find"))
            .unwrap()
            .split_whitespace()
            .skip(1)
            .map(|n| n.parse::<usize>().unwrap())
            .sum();
        assert_eq!(finds, counts.finds);

        assert!(summary(&events, &nemesis, false, 3).ends_with("verdict: INVALID: 3 anomalies"));
        assert!(summary(&events, &nemesis, false, 1).contains("INVALID: 1 anomaly"));
        let empty = summary(&[], &[], true, 0);
        assert!(
            empty.contains("no ok operations") && empty.contains("faults: none"),
            "{empty}"
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
