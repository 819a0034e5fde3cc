variable "region" {
  type    = string
  default = "us-east-1"
}

variable "bucket_name" {
  type        = string
  description = "The models bucket; INFERATECH_STORAGE_URL=s3://<bucket_name>/<key_prefix>"
}

variable "key_prefix" {
  type    = string
  default = "bundles/"
}

variable "events_lambda_arn" {
  type        = string
  description = "ARN of the Lambda running api.lambda_handler (it also serves the API via Mangum)"
}
