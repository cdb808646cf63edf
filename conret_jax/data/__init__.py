"""The tf.data input pipeline: sources (tfds, COCO json, TFRecords, synthetic shapes), decoding, preprocessing."""
