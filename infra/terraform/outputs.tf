output "storage_url" {
  value = "s3://${aws_s3_bucket.models.bucket}/${var.key_prefix}"
}
