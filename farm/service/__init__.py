"""The fine-tuning service (``farm service``): an OpenAI-compatible files and fine-tuning jobs
API on the warm pools. Built in steps; today: ``requests``, the job request as the farm reads it."""
