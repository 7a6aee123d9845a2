SELECT length('bench'), length('bench');
