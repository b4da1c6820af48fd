//! The two pictures of a training report, drawn with the `image` crate and a built-in 3×5
//! pixel font (upper-case letters, digits, a few signs): the confusion matrix as a heat map
//! with its counts, and loss and accuracy per epoch for the training and validation sets.

use image::{Rgb, RgbImage};

use super::metrics::EpochRecord;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GREY: Rgb<u8> = Rgb([190, 190, 190]);
const TRAIN: Rgb<u8> = Rgb([31, 119, 180]);
const VAL: Rgb<u8> = Rgb([230, 110, 20]);

/// Rows of each glyph, three bits each (the high bit is the left column).
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        ',' => [0, 0, 0, 2, 4],
        '-' => [0, 0, 7, 0, 0],
        '_' => [0, 0, 0, 0, 7],
        ':' => [0, 2, 0, 2, 0],
        '/' => [1, 1, 2, 4, 4],
        '%' => [5, 1, 2, 4, 5],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        ' ' => [0; 5],
        _ => [7, 1, 2, 0, 2],
    }
}

/// Width in pixels of `text` at `scale`.
fn text_width(text: &str, scale: u32) -> u32 {
    (text.chars().count() as u32 * 4).saturating_sub(1) * scale
}

/// Draws `text` with its top-left corner at (x, y); pixels outside the image are dropped.
fn draw_text(image: &mut RgbImage, x: i64, y: i64, text: &str, scale: u32, color: Rgb<u8>) {
    let scale = i64::from(scale);
    for (i, c) in text.chars().enumerate() {
        let left = x + i as i64 * 4 * scale;
        for (row, bits) in glyph(c).iter().enumerate() {
            for column in 0..3 {
                if bits & (4 >> column) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        put(image, left + column * scale + dx, y + row as i64 * scale + dy, color);
                    }
                }
            }
        }
    }
}

fn put(image: &mut RgbImage, x: i64, y: i64, color: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < image.width() && (y as u32) < image.height() {
        image.put_pixel(x as u32, y as u32, color);
    }
}

fn fill(image: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, color: Rgb<u8>) {
    for yy in y..y + h {
        for xx in x..x + w {
            put(image, xx, yy, color);
        }
    }
}

/// A line two pixels thick (Bresenham, doubled).
fn line(image: &mut RgbImage, from: (i64, i64), to: (i64, i64), color: Rgb<u8>) {
    let (mut x, mut y) = from;
    let (dx, dy) = ((to.0 - x).abs(), -(to.1 - y).abs());
    let (sx, sy) = (if x < to.0 { 1 } else { -1 }, if y < to.1 { 1 } else { -1 });
    let mut error = dx + dy;
    loop {
        fill(image, x, y, 2, 2, color);
        if (x, y) == to {
            break;
        }
        let twice = 2 * error;
        if twice >= dy {
            error += dy;
            x += sx;
        }
        if twice <= dx {
            error += dx;
            y += sy;
        }
    }
}

/// The confusion matrix: cells shaded by the fraction of their row (true class), counts in the
/// cells, class names on the rows, class numbers on the columns.
pub fn confusion_png(classes: &[String], confusion: &[Vec<u64>], title: &str) -> RgbImage {
    let n = classes.len() as i64;
    // 36-px cells with their counts; past 100 classes, 4-px cells without (a 1000-class matrix
    // would otherwise take gigabytes), the shading still showing where the errors are.
    let small = n > 100;
    let cell = if small { 4i64 } else { 36 };
    let names: Vec<String> = if small {
        Vec::new()
    } else {
        classes.iter().enumerate().map(|(i, c)| format!("{i} {c}")).collect()
    };
    let label_width = names.iter().map(|s| i64::from(text_width(s, 2))).max().unwrap_or(0);
    let (left, top) = (label_width + 16, 58i64);
    let footer = "ROWS: TRUE CLASS";
    let width = (left + n * cell + 16)
        .max(i64::from(text_width(title, 2)) + 20)
        .max(left + i64::from(text_width(footer, 2)) + 10);
    let height = top + n * cell + 34;
    let mut image = RgbImage::from_pixel(width as u32, height as u32, WHITE);
    draw_text(&mut image, 10, 10, title, 2, BLACK);
    draw_text(&mut image, left, 32, "PREDICTED", 2, BLACK);
    for (i, name) in names.iter().enumerate() {
        let i = i as i64;
        let y = top + i * cell + (cell - 10) / 2;
        draw_text(&mut image, left - 8 - i64::from(text_width(name, 2)), y, name, 2, BLACK);
        let column = i.to_string();
        let x = left + i * cell + (cell - i64::from(text_width(&column, 2))) / 2;
        draw_text(&mut image, x, top - 14, &column, 2, BLACK);
    }
    for (t, row) in confusion.iter().enumerate() {
        let total: u64 = row.iter().sum::<u64>().max(1);
        for (p, &count) in row.iter().enumerate() {
            let share = count as f64 / total as f64;
            let shade = |full: u8| (255.0 - share * (255.0 - f64::from(full))) as u8;
            let color = if t == p {
                Rgb([shade(20), shade(110), shade(40)])
            } else {
                Rgb([shade(200), shade(30), shade(30)])
            };
            let (x, y) = (left + p as i64 * cell, top + t as i64 * cell);
            fill(&mut image, x, y, cell - 1, cell - 1, color);
            if small {
                continue;
            }
            let text = count.to_string();
            let scale = if text_width(&text, 2) as i64 <= cell - 4 { 2 } else { 1 };
            let ink = if share > 0.5 { WHITE } else { BLACK };
            let tx = x + (cell - i64::from(text_width(&text, scale))) / 2;
            let ty = y + (cell - 5 * i64::from(scale)) / 2;
            draw_text(&mut image, tx, ty, &text, scale, ink);
        }
    }
    draw_text(&mut image, left, top + n * cell + 12, footer, 2, BLACK);
    image
}

/// Loss (left) and accuracy (right) per epoch, training in blue and validation in orange, with
/// the kept epoch marked.
pub fn history_png(history: &[EpochRecord], best_epoch: usize) -> RgbImage {
    let (panel_w, panel_h) = (380i64, 260i64);
    let mut image = RgbImage::from_pixel((2 * panel_w + 30) as u32, (panel_h + 70) as u32, WHITE);
    let loss: Vec<(f64, f64)> = history.iter().map(|r| (r.train_loss, r.val_loss)).collect();
    let accuracy: Vec<(f64, f64)> =
        history.iter().map(|r| (r.train_accuracy * 100.0, r.val_accuracy * 100.0)).collect();
    panel(&mut image, 10, "LOSS", &loss, best_epoch, (panel_w, panel_h));
    panel(&mut image, panel_w + 20, "ACCURACY %", &accuracy, best_epoch, (panel_w, panel_h));
    let y = panel_h + 48;
    fill(&mut image, 20, y, 14, 10, TRAIN);
    draw_text(&mut image, 40, y, "TRAIN", 2, BLACK);
    fill(&mut image, 110, y, 14, 10, VAL);
    draw_text(&mut image, 130, y, "VALIDATION", 2, BLACK);
    draw_text(&mut image, 260, y, &format!("KEPT EPOCH {best_epoch}"), 2, BLACK);
    image
}

fn panel(
    image: &mut RgbImage,
    x0: i64,
    title: &str,
    series: &[(f64, f64)],
    best_epoch: usize,
    (w, h): (i64, i64),
) {
    draw_text(image, x0 + 64, 8, title, 2, BLACK);
    let (left, top, right, bottom) = (x0 + 64, 30i64, x0 + w - 10, 30 + h - 30);
    let values = series.iter().flat_map(|(a, b)| [*a, *b]).filter(|v| v.is_finite());
    let (low, high) =
        values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !low.is_finite() || series.is_empty() {
        return;
    }
    let span = if high - low < 1e-9 { 1.0 } else { high - low };
    let epochs = series.len().max(2) - 1;
    let at = |index: usize, value: f64| {
        let x = left + (right - left) * index as i64 / epochs as i64;
        let y = bottom - ((value - low) / span * (bottom - top) as f64).round() as i64;
        (x, y)
    };
    line(image, (left, top), (left, bottom), GREY);
    line(image, (left, bottom), (right, bottom), GREY);
    for value in [low, high] {
        let label = if high > 10.0 { format!("{value:.1}") } else { format!("{value:.3}") };
        let (_, y) = at(0, value);
        draw_text(image, left - 6 - i64::from(text_width(&label, 2)), y - 4, &label, 2, BLACK);
    }
    draw_text(image, left, bottom + 6, "1", 2, BLACK);
    let last = series.len().to_string();
    draw_text(image, right - i64::from(text_width(&last, 2)), bottom + 6, &last, 2, BLACK);
    draw_text(image, (left + right) / 2 - 20, bottom + 6, "EPOCH", 2, BLACK);
    if best_epoch >= 1 && best_epoch <= series.len() {
        let (x, _) = at(best_epoch - 1, low);
        for y in (top..bottom).step_by(6) {
            fill(image, x, y, 1, 3, GREY);
        }
    }
    for (pick, color) in [(0, TRAIN), (1, VAL)] {
        let value = |i: usize| if pick == 0 { series[i].0 } else { series[i].1 };
        // A diverged epoch (infinite or NaN loss) leaves a gap rather than a line off the page.
        let point = |i: usize| value(i).is_finite().then(|| at(i, value(i)));
        for i in 1..series.len() {
            if let (Some(from), Some(to)) = (point(i - 1), point(i)) {
                line(image, from, to, color);
            }
        }
        if let [_] = series
            && let Some((x, y)) = point(0)
        {
            fill(image, x - 2, y - 2, 5, 5, color);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_where_asked() {
        let mut image = RgbImage::from_pixel(20, 10, WHITE);
        draw_text(&mut image, 1, 1, "1", 1, BLACK);
        // "1": rows 010, 110, 010, 010, 111.
        assert_eq!(*image.get_pixel(2, 1), BLACK);
        assert_eq!(*image.get_pixel(1, 1), WHITE);
        assert_eq!(*image.get_pixel(1, 2), BLACK);
        assert_eq!(*image.get_pixel(3, 5), BLACK);
        assert_eq!(text_width("10", 2), 14);
    }

    #[test]
    fn the_diagonal_of_a_perfect_matrix_is_dark() {
        let classes = vec!["a".to_string(), "b".to_string()];
        let image = confusion_png(&classes, &[vec![5, 0], vec![0, 5]], "T");
        let dark =
            |x: u32, y: u32| image.get_pixel(x, y).0.iter().map(|&v| u32::from(v)).sum::<u32>();
        // Cell corners (no text there): (0,0) full green, (0,1) white.
        let left = text_width("0 a", 2) + 16;
        assert!(dark(left + 1, 59) < 300, "diagonal cell");
        assert_eq!(dark(left + 36 + 1, 59), 765, "empty cell");
    }

    #[test]
    fn a_diverged_epoch_leaves_a_gap_and_a_thousand_classes_stay_small() {
        let record = |epoch, loss: f64| EpochRecord {
            epoch,
            lr: 1e-3,
            train_loss: loss,
            train_accuracy: 0.5,
            val_loss: loss,
            val_accuracy: 0.5,
        };
        let history =
            [record(1, 2.0), record(2, f64::INFINITY), record(3, f64::NAN), record(4, 1.0)];
        let image = history_png(&history, 1);
        assert_eq!(image.dimensions(), (790, 330));

        let classes: Vec<String> = (0..1000).map(|i| format!("class {i}")).collect();
        let confusion: Vec<Vec<u64>> =
            (0..1000).map(|t| (0..1000).map(|p| u64::from(t == p)).collect()).collect();
        let image = confusion_png(&classes, &confusion, "T");
        assert!(image.width() < 4100 && image.height() < 4100, "{:?}", image.dimensions());
    }
}
