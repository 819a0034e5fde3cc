# Minimal AWS storage for Inferatech: the models bucket and its ObjectCreated notification to
# the events Lambda (`api.lambda_handler`). Not applied by the test suite (no AWS here); check
# with `terraform init -backend=false && terraform validate`. See README.md for the rest.
terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = { source = "hashicorp/aws", version = "~> 5.0" }
  }
}

provider "aws" {
  region = var.region
}

resource "aws_s3_bucket" "models" {
  bucket = var.bucket_name
}

resource "aws_s3_bucket_public_access_block" "models" {
  bucket                  = aws_s3_bucket.models.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "models" {
  bucket = aws_s3_bucket.models.id
  rule {
    apply_server_side_encryption_by_default { sse_algorithm = "AES256" }
  }
}

# Abandoned multipart uploads otherwise keep costing storage forever.
resource "aws_s3_bucket_lifecycle_configuration" "models" {
  bucket = aws_s3_bucket.models.id
  rule {
    id     = "abort-incomplete-multipart"
    status = "Enabled"
    filter { prefix = "" }
    abort_incomplete_multipart_upload { days_after_initiation = 2 }
  }
}

resource "aws_lambda_permission" "s3_invoke" {
  statement_id  = "AllowModelsBucketInvoke"
  action        = "lambda:InvokeFunction"
  function_name = var.events_lambda_arn
  principal     = "s3.amazonaws.com"
  source_arn    = aws_s3_bucket.models.arn
}

resource "aws_s3_bucket_notification" "models" {
  bucket = aws_s3_bucket.models.id
  lambda_function {
    lambda_function_arn = var.events_lambda_arn
    events              = ["s3:ObjectCreated:*"]
    filter_prefix       = var.key_prefix
  }
  depends_on = [aws_lambda_permission.s3_invoke]
}
