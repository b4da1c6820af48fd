//! Scores of a classifier on a labelled set: accuracy, mean cross-entropy, per-class precision
//! and recall, and the confusion matrix (rows: true class, columns: predicted class).

use serde::Serialize;

/// Loss and accuracy of one epoch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
}

/// Precision, recall and support of one class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    pub class: String,
    /// Of the images predicted as this class, the fraction that are; 0 when none is predicted.
    pub precision: f64,
    /// Of the images of this class, the fraction predicted as it.
    pub recall: f64,
    /// Images of this class in the set.
    pub support: u64,
}

/// Scores of one set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    pub images: u64,
    pub accuracy: f64,
    /// Mean cross-entropy (natural log).
    pub loss: f64,
    pub per_class: Vec<ClassScore>,
    /// `confusion[true][predicted]`, counts.
    pub confusion: Vec<Vec<u64>>,
}

/// Scores `predicted` against `truth` (class indices into `classes`); `losses` holds each
/// image's cross-entropy.
pub fn evaluate(
    classes: &[String],
    truth: &[usize],
    predicted: &[usize],
    losses: &[f64],
) -> Evaluation {
    let n = classes.len();
    let mut confusion = vec![vec![0u64; n]; n];
    for (&t, &p) in truth.iter().zip(predicted) {
        if t < n && p < n {
            confusion[t][p] += 1;
        }
    }
    let images = truth.len() as u64;
    let correct: u64 = (0..n).map(|i| confusion[i][i]).sum();
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let per_class = classes
        .iter()
        .enumerate()
        .map(|(i, class)| {
            let support: u64 = confusion[i].iter().sum();
            let predicted_as: u64 = confusion.iter().map(|row| row[i]).sum();
            ClassScore {
                class: class.clone(),
                precision: ratio(confusion[i][i], predicted_as),
                recall: ratio(confusion[i][i], support),
                support,
            }
        })
        .collect();
    let loss =
        if losses.is_empty() { 0.0 } else { losses.iter().sum::<f64>() / losses.len() as f64 };
    Evaluation { images, accuracy: ratio(correct, images), loss, per_class, confusion }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_a_small_set_by_hand() {
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        // a: 3 images, 2 right, 1 taken for b; b: 2 images, both right; c: 1 image, taken for a.
        let truth = [0, 0, 0, 1, 1, 2];
        let predicted = [0, 0, 1, 1, 1, 0];
        let losses = [0.1, 0.2, 1.5, 0.3, 0.4, 2.5];
        let e = evaluate(&classes, &truth, &predicted, &losses);
        assert_eq!(e.confusion, vec![vec![2, 1, 0], vec![0, 2, 0], vec![1, 0, 0]]);
        assert_eq!(e.images, 6);
        assert!((e.accuracy - 4.0 / 6.0).abs() < 1e-12);
        assert!((e.loss - 5.0 / 6.0).abs() < 1e-12);
        let a = &e.per_class[0];
        assert!((a.precision - 2.0 / 3.0).abs() < 1e-12 && (a.recall - 2.0 / 3.0).abs() < 1e-12);
        let b = &e.per_class[1];
        assert!((b.precision - 2.0 / 3.0).abs() < 1e-12 && b.recall == 1.0);
        let c = &e.per_class[2];
        assert_eq!((c.precision, c.recall, c.support), (0.0, 0.0, 1));
    }
}
